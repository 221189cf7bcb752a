"""tools/make_dicom.py: DICOM test instances of a chosen size, each with its
own SOP Instance UID, and the data-set digest the PACS lab compares."""
from __future__ import annotations

import sys
from pathlib import Path

import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import make_dicom  # noqa: E402
from make_dicom import MakeDicomError, dataset_digest, make_instance, make_study, parse_size  # noqa: E402

MULTIFRAME_GRAYSCALE_BYTE_SC = "1.2.840.10008.5.1.4.1.1.7.2"


@pytest.mark.parametrize("text,size", [("2000", 2000), ("64K", 65536), ("1m", 1 << 20), ("100M", 100 << 20),
                                       ("3G", 3 << 30)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text,message", [
    ("12Q", "--size '12Q' is not a size such as"),
    ("-1", "--size '-1' is not a size such as"),
    ("100", "--size '100' is out of range: use 1280 bytes to 3G"),
    ("4G", "--size '4G' is out of range"),
])
def test_parse_size_rejects(text, message):
    with pytest.raises(MakeDicomError, match="^" + message.replace("(", r"\(")):
        parse_size(text)


@pytest.mark.parametrize("size", [1280, 2048, 65536, 1 << 20, 3 * (1 << 20) + 17, 9 << 20])
def test_instance_has_the_chosen_size_and_is_valid_dicom(tmp_path, size):
    path = tmp_path / "one.dcm"
    uid = make_instance(path, size)
    actual = path.stat().st_size
    assert abs(actual - size) <= size // 1000 + 256, (size, actual)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == MULTIFRAME_GRAYSCALE_BYTE_SC
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID == uid
    assert len(ds.PixelData) == ds.Rows * ds.Columns * int(ds.NumberOfFrames)
    assert ds.Rows <= make_dicom.MAX_ROWS


def test_study_instances_each_have_their_own_sop_instance_uid(tmp_path):
    made = make_study(tmp_path / "out", count=7, size=4096, studies=2)
    datasets = [pydicom.dcmread(path) for path, _ in made]
    assert len({ds.SOPInstanceUID for ds in datasets}) == 7
    assert [str(ds.SOPInstanceUID) for ds in datasets] == [uid for _, uid in made]
    assert len({ds.StudyInstanceUID for ds in datasets}) == 2
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 2
    assert {ds.PatientID for ds in datasets} == {"XDPLB-LAB"}
    assert [int(ds.InstanceNumber) for ds in datasets] == list(range(1, 8))
    # Two runs never repeat a UID: a PACS would count the second as the first.
    again = make_study(tmp_path / "again", count=7, size=4096)
    assert not {uid for _, uid in made} & {uid for _, uid in again}


@pytest.mark.parametrize("count,studies,message", [
    (0, 1, "--count 0 must be at least 1"),
    (3, 4, "--studies 4 must be between 1 and --count (3)"),
])
def test_study_rejects_bad_counts(tmp_path, count, studies, message):
    with pytest.raises(MakeDicomError) as err:
        make_study(tmp_path / "out", count, 4096, studies)
    assert str(err.value) == message
    assert not (tmp_path / "out").exists()


def test_dataset_digest_ignores_the_meta_header_only(tmp_path):
    original = tmp_path / "a.dcm"
    make_instance(original, 100_000)
    # What a PACS does: same data set, its own meta header.
    ds = pydicom.dcmread(original)
    ds.file_meta.ImplementationVersionName = "OTHER_PACS_1.0"
    ds.file_meta.SourceApplicationEntityTitle = "SYNAPSE"
    rewritten = tmp_path / "b.dcm"
    make_dicom.write_dataset(ds, rewritten)
    assert rewritten.stat().st_size != original.stat().st_size
    assert dataset_digest(rewritten) == dataset_digest(original)
    size, _ = dataset_digest(original)
    assert 100_000 - 1500 < size < original.stat().st_size

    damaged = bytearray(original.read_bytes())
    damaged[-5000] ^= 0xFF
    (tmp_path / "c.dcm").write_bytes(damaged)
    assert dataset_digest(tmp_path / "c.dcm")[1] != dataset_digest(original)[1]
    (tmp_path / "d.dcm").write_bytes(bytes(damaged[:-1000]))
    assert dataset_digest(tmp_path / "d.dcm")[0] == size - 1000


def test_dataset_digest_rejects_a_non_dicom_file(tmp_path):
    (tmp_path / "x.dcm").write_bytes(b"\0" * 300)
    with pytest.raises(MakeDicomError, match="not a DICOM Part 10 file"):
        dataset_digest(tmp_path / "x.dcm")


def test_cli_writes_and_lists_files(tmp_path, capsys):
    assert make_dicom.main(["--out", str(tmp_path / "s"), "--count", "3", "--size", "8K", "--studies", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    for line in lines:
        path, size, uid = line.split()
        assert Path(path).stat().st_size == int(size)
        assert pydicom.dcmread(path).SOPInstanceUID == uid


def test_cli_bad_size_is_one_sentence_and_writes_nothing(tmp_path, capsys):
    assert make_dicom.main(["--out", str(tmp_path / "s"), "--size", "lots"]) == 2
    err = capsys.readouterr().err
    assert err == "make_dicom.py: error: --size 'lots' is not a size such as 2000, 64K, 1M or 100M\n"
    assert not (tmp_path / "s").exists()
