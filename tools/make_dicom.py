#!/usr/bin/env python3
"""Generate DICOM test instances of a chosen size with pydicom.

  make_dicom.py --out DIR [--count N] [--size SIZE] [--studies S] [--patient ID]

Writes N files ``DIR/<study>-<n>.dcm`` (Part 10, explicit VR little endian),
each a Multi-frame Grayscale Byte Secondary Capture image of SIZE bytes
within 0.1% + 256 bytes (``2K``, ``64K``, ``1M``, ``100M``: K/M/G are powers
of 1024; at least 1280 bytes), spread over S
studies of one series each.  Every instance has its own SOP Instance UID,
because a PACS counts instances, not transfers.  The pixels are random, so
nothing on the path can shrink them.  Prints one line per file:
``<path> <bytes> <SOP Instance UID>``.

Works with pydicom 2.x (Debian's python3-pydicom, used on the Vagrant
modality) and 3.x (the project's .venv).  Python use::

    from make_dicom import make_instance, make_study
    make_instance(path, size=1 << 20)
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

# Multi-frame Grayscale Byte Secondary Capture Image Storage: any frame count,
# 8-bit pixels, no modality-specific attributes required.
SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7.2"
COLUMNS = 256                 # bytes per pixel row (8 bits, 1 sample)
MAX_ROWS = 4096               # rows per frame; more pixels make more frames
OVERHEAD = 900                # bytes of meta header and attributes, roughly
MIN_SIZE = 1280                # one pixel row and the attributes, rounded up
MAX_SIZE = 3 << 30            # PixelData has a 32-bit length; keep a margin
PREAMBLE = 132                # 128-byte preamble + "DICM"
_SIZE_RE = re.compile(r"(\d+)([KMG]?)", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


class MakeDicomError(ValueError):
    """Bad input; the message names the option and the value."""


def parse_size(text: str) -> int:
    """``"100M"`` -> 104857600; one clear error for anything else."""
    match = _SIZE_RE.fullmatch(text.strip())
    if not match:
        raise MakeDicomError(f"--size {text!r} is not a size such as 2000, 64K, 1M or 100M")
    size = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise MakeDicomError(f"--size {text!r} is out of range: use {MIN_SIZE} bytes to 3G")
    return size


def _frames(size: int) -> tuple[int, int]:
    """(rows per frame, frames) whose pixels come closest to ``size`` bytes."""
    rows_total = max(1, (size - OVERHEAD + COLUMNS // 2) // COLUMNS)
    frames = -(-rows_total // MAX_ROWS)
    return -(-rows_total // frames), frames


@dataclass(frozen=True)
class Study:
    """Identity shared by the instances of one study (one series)."""

    patient_id: str
    patient_name: str
    study_uid: str
    series_uid: str
    accession: str

    @classmethod
    def new(cls, patient_id: str = "XDPLB-LAB", label: str = "1") -> "Study":
        return cls(patient_id, f"Lab^Patient{label}", generate_uid(), generate_uid(),
                   f"XL{os.getpid() % 100000:05d}{label}"[:16])


def make_dataset(size: int, study: Study, number: int = 1) -> Dataset:
    """An instance of about ``size`` bytes (when written) in ``study``."""
    rows, frames = _frames(size)
    now = datetime.datetime.now()
    ds = Dataset()
    ds.SOPClassUID = SOP_CLASS
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = study.series_uid
    ds.PatientID = study.patient_id
    ds.PatientName = study.patient_name
    ds.AccessionNumber = study.accession
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.StudyDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = COLUMNS
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063    # Frame Time: frames are a sequence
    ds.FrameTime = 40.0
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = os.urandom(rows * COLUMNS * frames)
    ds["PixelData"].VR = "OB"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def write_dataset(ds: Dataset, path: Path) -> None:
    """Write a Part 10 file in explicit VR little endian."""
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:  # pydicom 2.x: the encoding lives on the dataset
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)


def make_instance(path: Path | str, size: int, study: Study | None = None, number: int = 1) -> str:
    """Write one instance of about ``size`` bytes; returns its SOP Instance UID."""
    ds = make_dataset(size, study or Study.new(), number)
    write_dataset(ds, Path(path))
    return str(ds.SOPInstanceUID)


def make_study(out: Path | str, count: int, size: int, studies: int = 1,
               patient_id: str = "XDPLB-LAB") -> list[tuple[Path, str]]:
    """Write ``count`` instances spread over ``studies`` studies into ``out``.

    Returns ``[(path, SOP Instance UID), ...]`` in the order written.
    """
    if count < 1:
        raise MakeDicomError(f"--count {count} must be at least 1")
    if not 1 <= studies <= count:
        raise MakeDicomError(f"--studies {studies} must be between 1 and --count ({count})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made = []
    groups = [Study.new(patient_id, str(s + 1)) for s in range(studies)]
    for n in range(count):
        study_no = n * studies // count
        path = out / f"study{study_no + 1}-{n + 1:04d}.dcm"
        made.append((path, make_instance(path, size, groups[study_no], n + 1)))
    return made


def dataset_digest(path: Path | str) -> tuple[int, str]:
    """(bytes, SHA-256) of a Part 10 file's data set, the part after its meta header.

    A PACS rewrites the meta header (its own implementation UID, source AE),
    so the data set is what must arrive byte for byte.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        head = fh.read(PREAMBLE + 12)
        # Preamble, "DICM", then (0002,0000) UL 4 <meta group length>.
        if head[PREAMBLE - 4:PREAMBLE] != b"DICM" or head[PREAMBLE:PREAMBLE + 6] != b"\x02\x00\x00\x00UL":
            raise MakeDicomError(f"{path}: not a DICOM Part 10 file with a meta group length")
        fh.seek(PREAMBLE + 12 + struct.unpack("<I", head[PREAMBLE + 8:PREAMBLE + 12])[0])
        size = 0
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="make_dicom.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="directory for the files (created)")
    p.add_argument("--count", type=int, default=1, help="instances to write (default 1)")
    p.add_argument("--size", default="64K", help="bytes per instance: 2K, 64K, 1M, 100M (default 64K)")
    p.add_argument("--studies", type=int, default=1, help="studies to spread them over (default 1)")
    p.add_argument("--patient", default="XDPLB-LAB", help="Patient ID (default XDPLB-LAB)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        size = parse_size(args.size)
        made = make_study(args.out, args.count, size, args.studies, args.patient)
    except (MakeDicomError, OSError) as exc:
        print(f"make_dicom.py: error: {exc}", file=sys.stderr)
        return 2
    for path, uid in made:
        print(f"{path} {path.stat().st_size} {uid}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
