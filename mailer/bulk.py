"""Bulk files for `mailer send --csv/--jsonl`: strict readers, one message's fields per row.

A file is either read whole or refused with one line naming the line and the problem: an
unclosed quote, a ragged row, a duplicate or empty column name, a field over the size limit,
text that is not UTF-8, JSON nested too deep, an empty file. A UTF-8 byte-order mark (what
spreadsheet programs write) is accepted.

Each row gets a default idempotency key derived from its content (`row_key`), so that rerunning
a file after a partial failure sends none of the rows already queued twice; an
`idempotency_key` column overrides it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["MAX_FIELD", "BadFile", "read_csv", "read_jsonl", "read_rows", "row_key"]

#: The largest CSV cell, in characters: the csv module's limit (128 KiB unless the process
#: changed it; bodies bigger than this belong in a --jsonl file).
MAX_FIELD = csv.field_size_limit()
#: The largest JSONL line, in characters.
MAX_LINE = 64 * MAX_FIELD
# Columns of a CSV file that hold lists (`;`-separated) or JSON objects.
CSV_LISTS = ("to", "cc", "bcc", "reply_to")
CSV_JSON = ("headers", "smtpapi")


class BadFile(Exception):
    """The file is refused; `line` is 0 when the problem is the whole file."""

    def __init__(self, line: int, field: str, problem: str) -> None:
        where = f"line {line}: " if line else ""
        super().__init__(f"{where}{field}: {problem}")
        self.line, self.field, self.problem = line, field, problem


def read_rows(path: str | Path, kind: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, Message fields) for every row of a "csv" or "jsonl" file, each with an
    idempotency key; raises `BadFile` (or OSError) with nothing returned on any problem."""
    text = _text(Path(path))
    rows = list(read_csv(text) if kind == "csv" else read_jsonl(text))
    if not rows:
        raise BadFile(0, "file", "no rows: the file is empty or has only a header")
    seen: Counter[str] = Counter()
    for _, row in rows:
        if "idempotency_key" not in row:
            digest = _digest(row)
            seen[digest] += 1
            row["idempotency_key"] = row_key(digest, seen[digest])
    return rows


def row_key(digest: str, occurrence: int) -> str:
    """The default key of a row: its content's digest and which copy of that content it is (two
    identical rows stay two messages; moving or inserting other rows changes nothing)."""
    return f"file-row:{digest}:{occurrence}"


def _digest(row: dict[str, Any]) -> str:
    canonical = json.dumps(row, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:32]


def _text(path: Path) -> str:
    data = path.read_bytes()
    if not data.strip():
        raise BadFile(0, "file", "the file is empty")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise BadFile(
            line, "file", f"not UTF-8 (byte 0x{data[exc.start]:02x}); save the file as UTF-8"
        ) from None


def read_jsonl(text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE:
            raise BadFile(number, "line", f"over {MAX_LINE:,} characters")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadFile(number, "line", f"not JSON ({exc.msg})") from None
        except RecursionError:
            raise BadFile(number, "line", "JSON nested too deep") from None
        if not isinstance(obj, dict):
            raise BadFile(number, "line", "expected a JSON object of Message fields")
        yield number, obj


def read_csv(text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    start = 1
    try:
        header = next(reader, None)
        if header is None:
            return
        _check_header(header)
        start = reader.line_num + 1
        for cells in reader:
            if not cells:  # a blank line
                start = reader.line_num + 1
                continue
            if len(cells) != len(header):
                raise BadFile(
                    start, "line", f"{len(cells)} cells for {len(header)} columns (a ragged row)"
                )
            yield start, _row(start, header, cells)
            start = reader.line_num + 1
    except csv.Error as exc:
        problem = str(exc)
        if "field larger than field limit" in problem:
            problem = f"a cell is over {MAX_FIELD:,} characters; use a --jsonl file"
        elif "unexpected end of data" in problem:
            problem = "a quoted cell is never closed (unclosed '\"')"
        raise BadFile(start, "line", problem) from None


def _check_header(header: list[str]) -> None:
    names = [name.strip() for name in header]
    for i, name in enumerate(names):
        if not name:
            raise BadFile(1, "header", f"column {i + 1} has no name")
        if names.index(name) != i:
            raise BadFile(1, "header", f"column {name!r} appears twice")
    header[:] = names


def _row(line: int, header: list[str], cells: list[str]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for key, value in zip(header, cells, strict=True):
        if len(value) > MAX_FIELD:
            raise BadFile(line, key, f"over {MAX_FIELD:,} characters")
        if value == "":
            continue
        if key in CSV_LISTS:
            row[key] = [v.strip() for v in value.split(";") if v.strip()]
        elif key in CSV_JSON:
            try:
                row[key] = json.loads(value)
            except json.JSONDecodeError:
                raise BadFile(line, key, "expected a JSON object") from None
            except RecursionError:
                raise BadFile(line, key, "JSON nested too deep") from None
        else:
            row[key] = value
    return row
