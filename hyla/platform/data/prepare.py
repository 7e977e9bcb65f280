"""`prepare`: a raw source tokenised once, in parallel on Ray Data, into a token store.

The source's files (sorted) are cut into pieces (a jsonl file into byte ranges of
data.shard_bytes, other files whole) and consecutive pieces are grouped into units of about
data.shard_bytes each; unit i becomes shard i. The cut depends only on the files and their
sizes, so the store's bytes are the same whatever the number of workers. Each Ray Data
worker tokenises whole units with the tokenizer's batch encoding, on one tokenizer thread
(the workers are the parallelism), and writes its shard: the unit's training documents,
then its validation documents (`held_out`, by their text); the driver writes the manifest
last. A rerun keeps every shard that verifies and writes only the rest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from hyla.platform.data.config import DataConfig
from hyla.platform.data.sources import Piece, format_of, held_out, read_piece, source_files
from hyla.platform.data.store import (
    FORMAT,
    MANIFEST,
    VERSION,
    Shard,
    read_shard_record,
    record_bytes,
    sha256,
    token_dtype,
    write_manifest,
    write_shard,
)
from hyla.platform.data.tokenizers import Tokenizer, load_tokenizer

ENCODE_BATCH = 256  # documents per encode_batch call
VALIDATION_RULE = (
    "a document is a validation document when the 64-bit BLAKE2b hash (person 'hyla-val') "
    "of its UTF-8 text, little-endian, is below val_fraction * 2**64; each shard holds its "
    "training documents, then its val_documents validation documents, in source order"
)


@dataclass(frozen=True)
class Progress:
    """Where a `prepare` stands, reported once at the start and after each shard written:
    shards and source bytes done (those a rerun kept count as done) and the total of each,
    the bytes tokenised by this call and the seconds it has taken."""

    shards_done: int
    shards: int
    bytes_done: int
    bytes: int
    bytes_written: int
    seconds: float

    def line(self) -> str:
        """The console's view: "12/125 shards, 96.0/1,048.6 MB of source, 3.2 MB/s"."""
        written = self.bytes_written / 1e6
        rate = f", {written / self.seconds:.1f} MB/s" if self.bytes_written else ""
        return (
            f"{self.shards_done}/{self.shards} shards, {self.bytes_done / 1e6:,.1f}/"
            f"{self.bytes / 1e6:,.1f} MB of source{rate}"
        )


OnProgress = Callable[[Progress], None]


def source_listing(cfg: DataConfig) -> list[dict[str, Any]]:
    """The source's files in order: URL, format, size and modification time (what a cached
    store is keyed by, and what its manifest records)."""
    listing = []
    for f in source_files(cfg):
        info = f.fs.info(f.path)
        modified = info.get("mtime", info.get("LastModified", info.get("last_modified")))
        listing.append(
            {
                "url": f.fs.unstrip_protocol(f.path),
                "format": format_of(f.path, cfg.format),
                "size": int(info["size"]),
                "modified": str(modified),
            }
        )
    return listing


def plan_units(listing: list[dict[str, Any]], shard_bytes: int) -> list[list[Piece]]:
    """The pieces of each shard, in stream order."""
    pieces = []
    for f in listing:
        step = shard_bytes if f["format"] == "jsonl" else max(f["size"], 1)
        pieces += [
            Piece(f["url"], f["format"], start, min(start + step, f["size"]))
            for start in range(0, max(f["size"], 1), step)
        ]
    units: list[list[Piece]] = [[]]
    size = 0
    for piece in pieces:
        if units[-1] and size + piece.end - piece.start > shard_bytes:
            units.append([])
            size = 0
        units[-1].append(piece)
        size += piece.end - piece.start
    return units if units[0] else []


def tokenise_unit(
    pieces: list[Piece], cfg: DataConfig, tokenizer: Tokenizer, dtype: np.dtype
) -> Shard:
    """The shard of a unit: its documents in source order, those `held_out` last."""
    parts: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    lengths: tuple[list[int], list[int]] = ([], [])
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    batch: list[str] = []

    def flush() -> None:
        for doc, ids in zip(batch, tokenizer.encode_batch(batch), strict=True):
            side = int(held_out(doc, cfg.val_fraction))
            parts[side].extend((ids, eos))
            lengths[side].append(len(ids) + 1)
        batch.clear()

    for piece in pieces:
        for doc in read_piece(piece, cfg.text_field):
            batch.append(doc)
            if len(batch) == ENCODE_BATCH:
                flush()
    flush()
    tokens = parts[0] + parts[1]
    stream = np.concatenate(tokens).astype(dtype) if tokens else np.zeros(0, dtype=dtype)
    ends = np.cumsum(np.asarray(lengths[0] + lengths[1], dtype=np.int64))
    return Shard(stream, ends, len(lengths[1]))


class _ShardWriter:
    """A Ray Data worker: tokenises the units of its batches and writes their shards."""

    def __init__(self, data: dict[str, Any], out: str) -> None:
        # One tokenizer thread: the workers are the parallelism. Set here, before the first
        # encode builds the tokenizer's thread pool, rather than in a runtime_env, so that
        # Ray starts the worker on one of its idle processes instead of a new one.
        os.environ["RAYON_NUM_THREADS"] = "1"
        self.cfg = DataConfig(**data)
        self.tokenizer = load_tokenizer(self.cfg)
        self.dtype = token_dtype(self.tokenizer.vocab_size)
        self.out = out

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One row per unit: its shard's record, or the input error that stopped it (Ray
        Data would wrap a raised ValueError into its own exception, losing the message the
        user needs)."""
        records, errors = [], []
        rows = zip(batch["index"], batch["pieces"], batch["made_from"], strict=True)
        for index, pieces, made_from in rows:
            unit = [Piece(**p) for p in json.loads(pieces)]
            try:
                shard = tokenise_unit(unit, self.cfg, self.tokenizer, self.dtype)
            except ValueError as e:
                records.append("")
                errors.append(str(e))
                continue
            record = write_shard(self.out, int(index), shard, made_from)
            records.append(json.dumps(record))
            errors.append("")
        return {"index": batch["index"], "record": records, "error": errors}


def store_identity(cfg: DataConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """What makes a store: the source's files (with sizes and modification times), the
    text field, the tokenizer (by content hash), the shard size and the validation
    fraction."""
    return {
        "source": cfg.source,
        "files": source_listing(cfg),
        "text_field": cfg.text_field,
        "tokenizer": {
            "name": tokenizer.name,
            "sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": int(tokenizer.eos_id),
            "eos_token": tokenizer.eos_token,
        },
        "shard_bytes": cfg.shard_bytes,
        "val_fraction": cfg.val_fraction,
    }


def prepare(
    cfg: DataConfig, out: str, workers: int = 0, progress: OnProgress | None = None
) -> dict[str, Any]:
    """Tokenise `cfg.source` into a token store at `out` on the Ray this process is connected
    to (Ray Data starts a local one if there is none); returns its manifest. `workers`: Ray
    Data workers (0: one per CPU). `progress`: called with a `Progress` as shards are
    written. A complete store of the same source and tokenizer at `out` is returned as it
    is; another store there is refused."""
    return _prepare(cfg, out, workers, store_identity(cfg, load_tokenizer(cfg)), progress)


def prepare_cached(
    cfg: DataConfig, cache_dir: str, workers: int = 0, progress: OnProgress | None = None
) -> str:
    """The URL of `cfg.source`'s store under `cache_dir`, prepared there unless it already
    is. Its name hashes what makes the store (the source listed, not read), so the same
    files under another spelling share one store, and changed files get a new one."""
    identity = store_identity(cfg, load_tokenizer(cfg))
    key = {k: v for k, v in identity.items() if k != "source"}
    url = f"{cache_dir.rstrip('/')}/{sha256(json.dumps(key, sort_keys=True).encode())[:24]}"
    _prepare(cfg, url, workers, identity, progress)
    return url


def _prepare(
    cfg: DataConfig,
    out: str,
    workers: int,
    identity: dict[str, Any],
    progress: OnProgress | None,
) -> dict[str, Any]:
    existing = _existing_manifest(out)
    if existing is not None:
        if any(existing.get(k) != v for k, v in identity.items() if k != "source"):
            raise ValueError(
                f"--out {out} already holds a token store of another source or tokenizer; "
                f"choose another --out (or delete that store)"
            )
        return existing
    units = plan_units(identity["files"], cfg.shard_bytes)
    if not units:
        raise ValueError(f"data.source {cfg.source!r} has no documents (its files are empty)")
    keys = _unit_keys(identity, units)
    records = _write_shards(cfg, out, units, keys, workers, progress)
    documents = sum(r["num_documents"] for r in records)
    if documents == 0:
        raise ValueError(f"data.source {cfg.source!r} has no documents")
    val_documents = sum(r["val_documents"] for r in records)
    if val_documents == 0:
        raise ValueError(
            f"data.val_fraction={cfg.val_fraction} holds out none of the {documents} documents "
            f"of data.source {cfg.source!r} for validation; raise it (1 holds out every "
            f"document: a store to evaluate on)"
        )
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        **identity,
        "dtype": token_dtype(identity["tokenizer"]["vocab_size"]).str,
        "num_tokens": sum(r["num_tokens"] for r in records),
        "num_documents": documents,
        "validation": {
            "rule": VALIDATION_RULE,
            "documents": val_documents,
            "tokens": sum(r["val_tokens"] for r in records),
        },
        "shards": [_manifest_entry(r) for r in records],
    }
    write_manifest(out, manifest)
    return manifest


def _existing_manifest(out: str) -> dict[str, Any] | None:
    fs, root = fsspec.core.url_to_fs(out)
    try:
        return json.loads(fs.cat_file(f"{root.rstrip('/')}/{MANIFEST}"))
    except FileNotFoundError:
        return None


def _manifest_entry(record: dict[str, Any]) -> dict[str, Any]:
    """A shard as the manifest lists it: counts (its last val_documents documents, of
    val_tokens tokens, are validation documents), sizes, and the hash of its record (which
    holds the block hashes a reader checks)."""
    raw = record_bytes(record)
    return {
        "num_tokens": record["num_tokens"],
        "num_documents": record["num_documents"],
        "val_documents": record["val_documents"],
        "val_tokens": record["val_tokens"],
        "tokens_bytes": record["tokens_bytes"],
        "docs_bytes": record["docs_bytes"],
        "tokens_sha256": record["tokens_sha256"],
        "record_bytes": len(raw),
        "record_sha256": sha256(raw),
    }


def _unit_keys(identity: dict[str, Any], units: list[list[Piece]]) -> list[str]:
    """What each shard is made of: its pieces, and the files and tokenizer of the store."""
    common = {k: v for k, v in identity.items() if k != "source"}
    return [
        sha256(json.dumps([common, [dataclasses.asdict(p) for p in unit]]).encode())
        for unit in units
    ]


def _write_shards(
    cfg: DataConfig,
    out: str,
    units: list[list[Piece]],
    keys: list[str],
    workers: int,
    progress: OnProgress | None,
) -> list[dict[str, Any]]:
    """Every shard's record, in order: those already written and verified, the rest
    written by Ray Data workers. With `progress`, Ray Data's own progress bars are off."""
    import ray

    start = time.perf_counter()
    records = {
        i: r for i in range(len(units)) if (r := read_shard_record(out, i, keys[i])) is not None
    }
    sizes = [sum(p.end - p.start for p in unit) for unit in units]
    kept = sum(sizes[i] for i in records)

    def report() -> None:
        done = sum(sizes[i] for i in records)
        seconds = time.perf_counter() - start
        if progress is not None:
            progress(Progress(len(records), len(units), done, sum(sizes), done - kept, seconds))

    report()
    # Largest first, and a worker takes its next unit only when it is free: the last units
    # to finish are the small ones, so no worker idles while another has a long queue.
    todo = sorted((i for i in range(len(units)) if i not in records), key=lambda i: -sizes[i])
    if todo:
        rows = [
            {
                "index": i,
                "pieces": json.dumps([dataclasses.asdict(p) for p in units[i]]),
                "made_from": keys[i],
            }
            for i in todo
        ]
        if not ray.is_initialized():
            ray.init()
        cpus = int(ray.available_resources().get("CPU", 1)) or 1
        pool = min(len(todo), workers or cpus)
        written = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            _ShardWriter,
            fn_constructor_kwargs={"data": dataclasses.asdict(cfg), "out": out},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=pool, max_tasks_in_flight_per_actor=1),
            num_cpus=1,
        )
        context = ray.data.DataContext.get_current()
        shown = context.enable_progress_bars, context.print_on_execution_start
        if progress is not None:  # the caller shows progress: Ray Data's would repeat it
            context.enable_progress_bars = context.print_on_execution_start = False
        failed = []
        try:
            for row in written.iter_rows():
                if row["error"]:
                    failed.append((int(row["index"]), row["error"]))
                    continue
                record = json.loads(row["record"])
                records[record["index"]] = record
                report()
        finally:
            context.enable_progress_bars, context.print_on_execution_start = shown
        if failed:  # the first bad input in stream order, whichever worker met it first
            raise ValueError(min(failed)[1])
    return [records[i] for i in range(len(units))]
