"""Raw sources: the documents of text, jsonl and parquet files at any fsspec URL or glob,
and the Python standard library's own files. A source is read whole, in sorted file
order (`read_documents`), or piece by piece (`read_piece`: a byte range of a jsonl file,
or a whole file), which is how `prepare` spreads one source over many workers. Which
documents are held out for validation is decided by `held_out`, from their text alone."""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np

from hyla.platform.data.config import DataConfig
from hyla.platform.data.tokenizers import Tokenizer

SUFFIX_FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}


def stdlib_files() -> list[str]:
    """The standard library's own .py files (not site-packages), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        str(p) for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts
    )


def format_of(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return SUFFIX_FORMATS.get(Path(path).suffix, "text")


def source_files(cfg: DataConfig) -> list[Any]:
    """The fsspec OpenFiles of `cfg.source`, sorted; ValueError naming the source when it is
    not a URL fsspec knows, or matches no file."""
    if cfg.source == "stdlib":
        return [fsspec.open(p, "rb") for p in stdlib_files()]
    try:
        files = fsspec.open_files(cfg.source, "rb")
    except (ValueError, ImportError) as e:  # an unknown protocol, or its package is missing
        raise ValueError(f"data.source {cfg.source!r} is not a readable fsspec URL: {e}") from None
    if not files:
        raise ValueError(f"data.source matched no files: {cfg.source!r}")
    return sorted(files, key=lambda f: f.path)


def read_documents(cfg: DataConfig) -> Iterator[str]:
    """The documents of `cfg.source`, files in sorted order. A file that cannot be read or
    parsed raises ValueError naming it (and the line, for jsonl)."""
    for f in source_files(cfg):
        fmt = format_of(f.path, cfg.format)
        try:
            with f as handle:
                yield from _documents_of(handle, fmt, cfg.text_field, f.path)
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            raise ValueError(f"data.source file {f.path} cannot be read: {e}") from None


@dataclass(frozen=True)
class Piece:
    """Bytes [start, end) of a source file: its documents are the jsonl lines that begin
    there, or the whole file's documents for text and parquet (start 0, end its size)."""

    url: str
    fmt: str
    start: int
    end: int


def read_piece(piece: Piece, text_field: str) -> Iterator[str]:
    """The documents of one piece, in file order. Pieces that tile a file give, together,
    exactly the documents `read_documents` gives for it."""
    try:
        with fsspec.open(piece.url, "rb") as handle:
            if piece.fmt != "jsonl":
                yield from _documents_of(handle, piece.fmt, text_field, piece.url)
                return
            if piece.start > 0:  # a line belongs to the piece its first byte lies in
                handle.seek(piece.start - 1)
                handle.readline()
            while handle.tell() < piece.end:
                offset = handle.tell()
                line = handle.readline()
                if not line:
                    return
                if line.strip():
                    yield _piece_line_text(line, text_field, piece.url, offset)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise ValueError(f"data.source file {piece.url} cannot be read: {e}") from None


def _piece_line_text(line: bytes, field: str, url: str, offset: int) -> str:
    """The text of a jsonl line at byte `offset` of its file. A piece does not know its
    lines' numbers; only a line that fails is worth counting them for."""
    try:
        return _jsonl_text(line, field, url, "")
    except ValueError:
        line_no = 1
        with fsspec.open(url, "rb") as f:
            while f.tell() < offset:  # by the MiB: the failing line may lie deep in the file
                line_no += f.read(min(1 << 20, offset - f.tell())).count(b"\n")
        return _jsonl_text(line, field, url, f"line {line_no}")  # raises, now with the line


def _documents_of(handle: Any, fmt: str, field: str, path: str) -> Iterator[str]:
    if fmt == "text":
        yield handle.read().decode("utf-8", errors="replace")
    elif fmt == "jsonl":
        for line_no, line in enumerate(handle, 1):
            if line.strip():
                yield _jsonl_text(line, field, path, f"line {line_no}")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(handle, columns=[field])
        except (pa.ArrowException, KeyError) as e:
            raise ValueError(
                f"data.source file {path} is not parquet with a column data.text_field="
                f"{field!r}: {e}"
            ) from None
        yield from (str(x) for x in table.column(field).to_pylist())


def _jsonl_text(line: bytes, field: str, path: str, where: str) -> str:
    try:
        record = json.loads(line)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        column = f" column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise ValueError(f"data.source file {path} {where}{column} is not JSON: {e}") from None
    if not isinstance(record, dict):
        raise ValueError(
            f"data.source file {path} {where} must be a JSON object with "
            f"data.text_field {field!r}, got {type(record).__name__}"
        )
    if field not in record:
        raise ValueError(
            f"data.text_field {field!r} is missing in {path} {where}; keys there: {sorted(record)}"
        )
    return str(record[field])


def held_out(document: str, fraction: float) -> bool:
    """Whether a document is a validation document: the 64-bit BLAKE2b hash of its UTF-8
    text, read as a fraction of 2**64, is below `fraction`. It depends on the text alone, so
    the split is the same whatever the shards, workers or file names, and no copy of a
    validation document is trained on."""
    digest = hashlib.blake2b(
        document.encode("utf-8", "surrogatepass"), digest_size=8, person=b"hyla-val"
    ).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def token_streams(cfg: DataConfig, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation): the documents tokenised and concatenated, each followed by
    EOS, in source order: those `held_out` at data.val_fraction in the second, the first
    data.max_documents others in the first. The reference that the two parts of a token
    store prepared from the same source must equal."""
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    parts: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    for doc, held in split_documents(cfg):
        parts[held].extend((tokenizer.encode(doc), eos))
    if not any(parts):
        raise ValueError(f"data.source {cfg.source!r} has no documents")
    empty = np.zeros(0, dtype=np.int32)
    train, validation = (np.concatenate(p) if p else empty for p in parts)
    return train, validation


def split_documents(cfg: DataConfig) -> Iterator[tuple[str, bool]]:
    """The documents of `cfg.source` in source order, each with whether it is a validation
    document (`held_out` at data.val_fraction); training documents past the first
    data.max_documents are left out."""
    trained = 0
    for doc in read_documents(cfg):
        validation = held_out(doc, cfg.val_fraction)
        if not validation:
            if cfg.max_documents is not None and trained >= cfg.max_documents:
                continue
            trained += 1
        yield doc, validation
