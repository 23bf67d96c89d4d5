"""Where documents come from: text files and folders, jsonl, parquet, Hugging Face datasets, and
the default corpus, the Python standard library of the running interpreter (real text, on
every machine, no download).

A source spec is a string:
    "stdlib"                      every .py file of this interpreter's standard library
    "path/to/file.txt"            one document per file
    "path/to/folder"              every text file below it (see TEXT_SUFFIXES), one doc each
    "path/to/data.jsonl"          one document per line, its `text_field` (default "text")
    "path/to/data.parquet"        one document per row, its `text_field`
    "hf:name[:config][:split]"    a Hugging Face dataset, streamed (needs `datasets` + network)

Bad input never stops a run: an unreadable file, invalid UTF-8, a jsonl line that is not JSON
or lacks the text field, a corrupt or truncated parquet file is recorded in `SourceErrors`
(file, line, reason) and skipped. A source spec that names nothing raises SourceError.

For parallel reading a file is cut into `Piece`s (`split_file`): a jsonl file into runs of
lines (byte ranges found by one pass that only counts newlines), a parquet file into runs of row
groups, any other file is one piece. `iter_piece` reads one; the pieces of a file, read in order,
give exactly the documents (and errors, with their line numbers) of `iter_file` (a parquet file
corrupt past its footer aside: each piece then reports and skips its own unreadable rest).
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import PretrainError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".js", ".ts", ".html", ".tex", ".json"}


class SourceError(PretrainError, FileNotFoundError):
    """A source spec that names nothing readable at all (a corrupt file is a SourceErrors entry)."""


@dataclass
class Document:
    text: str
    source: str  # file path (or dataset name) it came from
    line: int | None = None  # 1-based line for jsonl, row for parquet


@dataclass
class SourceErrors:
    """Problems met while reading; each entry is (file, line or None, reason)."""

    entries: list[tuple[str, int | None, str]] = field(default_factory=list)
    max_kept: int = 1000  # keep the first ones verbatim, count the rest

    count: int = 0

    def add(self, file: str, line: int | None, reason: str) -> None:
        self.count += 1
        if len(self.entries) < self.max_kept:
            self.entries.append((file, line, reason))

    def summary(self) -> list[str]:
        return [f"{f}:{ln}: {r}" if ln is not None else f"{f}: {r}" for f, ln, r in self.entries]


def stdlib_files() -> list[Path]:
    """The .py files of this interpreter's standard library (site-packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file()
    )


def expand_source(spec: str) -> list[str]:
    """The files (or the one dataset spec) a source stands for, in a fixed order."""
    if spec == "stdlib":
        return [str(p) for p in stdlib_files()]
    if spec.startswith("hf:"):
        return [spec]
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _is_text_file(p))
        return [str(p) for p in files]
    if path.is_file():
        return [str(path)]
    raise SourceError(f"data source {spec!r}: no such file or folder (data.sources)")


def _is_text_file(path: Path) -> bool:
    return path.suffix in TEXT_SUFFIXES or path.suffix in (".jsonl", ".parquet")


@dataclass(frozen=True)
class Piece:
    """A part of one expanded source entry: a jsonl file's lines from byte `start` (line number
    `first`) to byte `stop`, a parquet file's row groups [start, stop) (first row number
    `first`); for other files and hf: datasets, the whole entry."""

    path: str
    start: int = 0
    stop: int | None = None  # None: to the end
    first: int = 1
    docs: int = 1  # documents it holds at most (lines, rows; 1 for a text file)


def split_file(path: str, docs_per_piece: int) -> list[Piece]:
    """`path` cut into pieces of at most `docs_per_piece` lines / rows (whole row groups, so a
    row group larger than that is a piece of its own)."""
    suffix = Path(path).suffix
    if path.startswith("hf:") or suffix not in (".jsonl", ".parquet"):
        return [Piece(path)]
    pieces = []
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(path).metadata
        except (OSError, ValueError):
            return [Piece(path)]  # reading it reports the error
        start, rows, first = 0, 0, 1
        for group in range(meta.num_row_groups):
            n = meta.row_group(group).num_rows
            if rows and rows + n > docs_per_piece:
                pieces.append(Piece(path, start, group, first, rows))
                start, first, rows = group, first + rows, 0
            rows += n
        pieces.append(Piece(path, start, meta.num_row_groups, first, rows))
        return pieces
    try:
        f = open(path, "rb")
    except OSError:
        return [Piece(path)]  # reading it reports the error
    with f:
        start, offset, lines, first, last = 0, 0, 0, 1, b"\n"
        while block := f.read(1 << 24):
            ends = np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n")) + offset + 1
            # A piece ends after its docs_per_piece-th line: every docs_per_piece-th newline,
            # counting the lines already in the current piece.
            for end in ends[docs_per_piece - lines - 1 :: docs_per_piece].tolist():
                pieces.append(Piece(path, start, end, first, docs_per_piece))
                start, first = end, first + docs_per_piece
            lines = (lines + len(ends)) % docs_per_piece
            offset += len(block)
            last = block[-1:]
    if offset > start or not pieces:  # the rest, with a last line that may lack its newline
        pieces.append(Piece(path, start, None, first, lines + (last != b"\n")))
    return pieces


def iter_file(path: str, errors: SourceErrors, text_field: str = "text") -> Iterator[Document]:
    """The documents of one expanded source entry."""
    return iter_piece(Piece(path), errors, text_field)


def iter_piece(piece: Piece, errors: SourceErrors, text_field: str = "text") -> Iterator[Document]:
    """The documents of one piece of an expanded source entry."""
    path = piece.path
    if path.startswith("hf:"):
        yield from _iter_hf(path, text_field)
        return
    suffix = Path(path).suffix
    try:
        if suffix == ".jsonl":
            yield from _iter_jsonl(path, errors, text_field, piece)
        elif suffix == ".parquet":
            yield from _iter_parquet(path, errors, text_field, piece)
        else:
            raw = Path(path).read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                errors.add(path, None, f"invalid UTF-8 at byte {e.start}; file skipped")
                return
            yield Document(text, path)
    except OSError as e:
        errors.add(path, None, f"unreadable: {e.strerror or e}")


def _iter_jsonl(
    path: str, errors: SourceErrors, text_field: str, piece: Piece
) -> Iterator[Document]:
    with open(path, "rb") as f:
        f.seek(piece.start)
        offset = piece.start
        for number, raw in enumerate(f, start=piece.first):
            if piece.stop is not None and offset >= piece.stop:
                return
            offset += len(raw)
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                errors.add(path, number, f"invalid UTF-8 at byte {e.start}")
                continue
            except json.JSONDecodeError as e:
                errors.add(path, number, f"not JSON ({e.msg})")
                continue
            except RecursionError:
                errors.add(path, number, "JSON nested too deeply")
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                errors.add(path, number, f"no string field {text_field!r}")
                continue
            yield Document(text, path, number)


def _iter_parquet(
    path: str, errors: SourceErrors, text_field: str, piece: Piece
) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = piece.first - 1
    try:
        table = pq.ParquetFile(path)
        if text_field not in table.schema_arrow.names:
            if piece.start == 0:  # reported once per file, by its first piece
                errors.add(path, None, f"no column {text_field!r} (columns: {table.schema_arrow.names})")
            return
        stop = table.metadata.num_row_groups if piece.stop is None else piece.stop
        for batch in table.iter_batches(columns=[text_field], row_groups=range(piece.start, stop)):
            for text in batch.column(0).to_pylist():
                row += 1
                if isinstance(text, str):
                    yield Document(text, path, row)
                else:
                    errors.add(path, row, f"{text_field!r} is not a string")
    except (pa.ArrowException, OSError, ValueError) as e:  # ArrowInvalid: corrupt or truncated
        where = f"after row {row}, the rest skipped" if row else "file skipped"
        errors.add(path, None, f"not a readable parquet file ({str(e)[:200]}); {where}")


def _iter_hf(spec: str, text_field: str) -> Iterator[Document]:
    try:
        import datasets
    except ImportError as e:
        raise SourceError(f"source {spec!r} needs the `datasets` package: pip install -e .[hub]") from e
    parts = spec[3:].split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 else "train"
    stream = datasets.load_dataset(name, config, split=split, streaming=True)
    for row, record in enumerate(stream, start=1):
        text = record.get(text_field)
        if isinstance(text, str):
            yield Document(text, spec, row)


def iter_documents(spec: str, errors: SourceErrors | None = None, text_field: str = "text"):
    """Every document of a source spec, in a fixed order."""
    errors = errors if errors is not None else SourceErrors()
    for path in expand_source(spec):
        yield from iter_file(path, errors, text_field)
