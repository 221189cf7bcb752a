"""Line numbers for a parsed TOML document.

tomllib returns plain dicts and lists with no positions.  When a pool file
has problems, ``line_index`` walks the (already valid) TOML text once, noting
the line of every table header and every key, and maps them onto the parsed
dicts by identity, so a problem found in a dict can name its line.  A valid
pool file never runs it.
"""
from __future__ import annotations

import bisect
import re
import tomllib
from typing import Any

BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")  # a key TOML lets one write unquoted


class Lines:
    """Line numbers of a parsed document's tables and keys, looked up by the dicts themselves."""

    def __init__(self) -> None:
        self.tables: dict[int, int] = {}
        self.keys: dict[tuple[int, str], int] = {}

    def find(self, places) -> int | None:
        """The line of the first of ``places`` ((table, key or None) pairs) that is known."""
        for table, key in places:
            if table is None:
                continue
            line = self.keys.get((id(table), key)) if key is not None else None
            if line is None:
                line = self.tables.get(id(table))
            if line is not None:
                return line
        return None


def _end_of_basic(s: str, i: int) -> int:
    """Index just past the closing quote of a "..." string whose body starts at i."""
    while s[i] != '"':
        i += 2 if s[i] == "\\" else 1
    return i + 1


def _end_of_multiline(s: str, i: int, quotes: str) -> int:
    """Index just past a multi-line string's closing quotes; its body starts at i."""
    while True:
        if quotes == '"""' and s[i] == "\\":
            i += 2
        elif s.startswith(quotes, i):
            i += 3
            for _ in range(2):  # up to two quotes may sit right before the delimiter
                if s.startswith(quotes[0], i):
                    i += 1
            return i
        else:
            i += 1


def _end_of_value(s: str, i: int) -> int:
    """Index just past a value (and the rest of its line) starting at or after i."""
    depth = 0
    while i < len(s):
        if s.startswith('"""', i) or s.startswith("'''", i):
            i = _end_of_multiline(s, i + 3, s[i:i + 3])
        elif s[i] == '"':
            i = _end_of_basic(s, i + 1)
        elif s[i] == "'":
            i = s.index("'", i + 1) + 1
        elif s[i] in "[{":
            depth += 1
            i += 1
        elif s[i] in "]}":
            depth -= 1
            i += 1
        elif s[i] == "#":
            end = s.find("\n", i)
            i = len(s) if end < 0 else end
        elif s[i] == "\n" and depth == 0:
            return i + 1
        else:
            i += 1
    return i


def _dotted_key(s: str, i: int) -> tuple[tuple[str, ...], int]:
    """Parse a (dotted) key at i; return its parts and the index of what follows."""
    parts = []
    while True:
        while s[i] in " \t":
            i += 1
        if s[i] == '"':
            end = _end_of_basic(s, i + 1)
            parts.append(tomllib.loads(f"k = {s[i:end]}")["k"])  # TOML's own escapes
        elif s[i] == "'":
            end = s.index("'", i + 1) + 1
            parts.append(s[i + 1:end - 1])
        else:
            end = BARE_KEY_RE.match(s, i).end()
            parts.append(s[i:end])
        i = end
        while s[i] in " \t":
            i += 1
        if s[i] != ".":
            return tuple(parts), i
        i += 1


def _scan(text: str):
    """Yield ("table", keys, is_array, line) for each header and ("key", keys, line) for each key."""
    s = text.replace("\r\n", "\n")
    starts = [0] + [m.end() for m in re.finditer("\n", s)]
    i = 0
    while i < len(s):
        c = s[i]
        if c in " \t\n":
            i += 1
        elif c == "#":
            end = s.find("\n", i)
            i = len(s) if end < 0 else end
        elif c == "[":
            array = s.startswith("[[", i)
            keys, i = _dotted_key(s, i + (2 if array else 1))
            yield ("table", keys, array, bisect.bisect_right(starts, i))
            i += 2 if array else 1
        else:
            line = bisect.bisect_right(starts, i)
            keys, i = _dotted_key(s, i)
            yield ("key", keys, line)
            i = _end_of_value(s, i + 1)  # past the "="


def _walk(doc: dict, path: tuple) -> Any:
    node: Any = doc
    for step in path:
        node = node[step]
    return node


def scan_lines(text: str, doc: dict) -> Lines:
    """Map every table and key of ``doc`` (parsed from valid ``text``) to its line."""
    paths: dict[tuple, int] = {}                  # concrete path (keys and array indices) -> line
    arrays: dict[tuple, int] = {}                 # path of an array of tables -> its length so far
    current: tuple = ()

    def into(path: tuple, key: str, line: int) -> tuple:
        path += (key,)
        paths.setdefault(path, line)
        if path in arrays:                        # [[a]] then [a.b]: b is in a's last element
            path += (arrays[path] - 1,)
        return path

    for event in _scan(text):
        if event[0] == "table":
            _, keys, array, line = event
            path = ()
            for key in keys[:-1]:
                path = into(path, key, line)
            path += (keys[-1],)
            paths.setdefault(path, line)
            if array:
                arrays[path] = arrays.get(path, 0) + 1
                path += (arrays[path] - 1,)
            paths[path] = line
            current = path
        else:
            _, keys, line = event
            path = current
            for key in keys:
                path = into(path, key, line)

    lines = Lines()
    for path, line in paths.items():
        try:
            parent, node = _walk(doc, path[:-1]), _walk(doc, path)
        except (KeyError, IndexError, TypeError):
            continue
        if isinstance(path[-1], str) and isinstance(parent, dict):
            lines.keys[(id(parent), path[-1])] = line
        if isinstance(node, dict):
            lines.tables[id(node)] = line                 # its header, or its key's line
        elif isinstance(node, list):
            for item in node:                             # an inline array of tables: the key's line,
                if isinstance(item, dict):                # unless the item has a [[header]] of its own
                    lines.tables.setdefault(id(item), line)
    return lines


def line_index(text: str, doc: dict) -> Lines:
    """scan_lines, but a scanner bug costs only the line numbers, never the error report."""
    try:
        return scan_lines(text, doc)
    except Exception:  # noqa: BLE001 - line numbers are a help; the problems are reported regardless
        return Lines()
