"""The token store: a corpus tokenised once (`hyla.platform.data.prepare`), read by every
rank without holding it.

Layout under the store's URL (any fsspec URL):

    manifest.json          written last: its presence marks a complete store
    shards/00000.tokens    token ids, little-endian, the smallest dtype that holds the vocabulary
    shards/00000.docs      int64: where each document of the shard ends (token offsets)
    shards/00000.json      the shard's counts and hashes: of both files, and of every
                           BLOCK_BYTES block of its tokens

The shards, in order, hold every document of the source, each followed by EOS. Each
shard holds its training documents first and its validation documents (held out by their
text, `hyla.platform.data.sources.held_out`) last; the manifest gives their counts per shard.
A store is read as its two parts (`TokenStore.part`), each the concatenation of its side of
every shard: the same streams `hyla.platform.data.sources.token_streams` builds in memory.
A reader verifies each block of tokens against its hash before it first uses it, so it reads
only the blocks of its own samples: memory-mapped on local disk, by ranged reads through a
bounded local cache from remote storage.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

FORMAT = "hyla-token-store"
VERSION = 2  # 2: validation documents held out at prepare time
MANIFEST = "manifest.json"
BLOCK_BYTES = 1 << 20  # the unit of hashing, reading and caching


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of the vocabulary."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def shard_name(index: int) -> str:
    return f"shards/{index:05d}"


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def write_atomic(fs: Any, path: str, data: bytes) -> None:
    """`data` at `path`, never half-written: an object store's PUT is whole already; a local
    file is written beside and renamed."""
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(fs._parent(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


@dataclass(frozen=True)
class Shard:
    """A shard's contents: its training documents, then its `val_documents` validation
    documents, each followed by EOS (in the store's dtype), and the token offset where each
    document ends."""

    tokens: np.ndarray
    doc_ends: np.ndarray
    val_documents: int


def write_shard(url: str, index: int, shard: Shard, made_from: str) -> dict:
    """Write shard `index` of the store at `url` and its record, last; returns the record.
    `made_from` names what the shard was made of (source pieces and tokenizer), so a rerun
    reuses it only for the same input."""
    tokens, doc_ends, val_documents = shard.tokens, shard.doc_ends, shard.val_documents
    first_val = len(doc_ends) - val_documents
    val_tokens = len(tokens) - (int(doc_ends[first_val - 1]) if first_val else 0)
    fs, root = fsspec.core.url_to_fs(url)
    name = f"{root.rstrip('/')}/{shard_name(index)}"
    token_bytes = tokens.astype(tokens.dtype.newbyteorder("<"), copy=False).tobytes()
    doc_bytes = doc_ends.astype("<i8").tobytes()
    write_atomic(fs, f"{name}.tokens", token_bytes)
    write_atomic(fs, f"{name}.docs", doc_bytes)
    record = {
        "index": index,
        "made_from": made_from,
        "num_tokens": len(tokens),
        "num_documents": len(doc_ends),
        "val_documents": val_documents,
        "val_tokens": val_tokens,
        "tokens_bytes": len(token_bytes),
        "docs_bytes": len(doc_bytes),
        "tokens_sha256": sha256(token_bytes),
        "docs_sha256": sha256(doc_bytes),
        "block_sha256": [
            sha256(token_bytes[i : i + BLOCK_BYTES])
            for i in range(0, len(token_bytes), BLOCK_BYTES)
        ],
    }
    write_atomic(fs, f"{name}.json", record_bytes(record))
    return record


def record_bytes(record: dict) -> bytes:
    """A shard's record as its file holds it (the manifest hashes these bytes)."""
    return json.dumps(record).encode()


def read_shard_record(url: str, index: int, made_from: str) -> dict | None:
    """The record of a shard made from `made_from` whose files are all there and match
    their hashes, else None (a shard to write again)."""
    fs, root = fsspec.core.url_to_fs(url)
    name = f"{root.rstrip('/')}/{shard_name(index)}"
    try:
        record = json.loads(fs.cat_file(f"{name}.json"))
        token_bytes, doc_bytes = fs.cat_file(f"{name}.tokens"), fs.cat_file(f"{name}.docs")
    except (FileNotFoundError, ValueError):
        return None
    if (sha256(token_bytes), sha256(doc_bytes), made_from) != (
        record.get("tokens_sha256"),
        record.get("docs_sha256"),
        record.get("made_from"),
    ):
        return None
    return record


def write_manifest(url: str, manifest: dict) -> None:
    fs, root = fsspec.core.url_to_fs(url)
    write_atomic(fs, f"{root.rstrip('/')}/{MANIFEST}", json.dumps(manifest, indent=1).encode())


def is_store(url: str) -> bool:
    """Whether `url` is a token store, complete or half-written (it has shards/)."""
    if url in ("stdlib", "mqar") or any(c in url for c in "*?["):
        return False
    try:
        fs, root = fsspec.core.url_to_fs(url)
        root = root.rstrip("/")
        return bool(fs.exists(f"{root}/{MANIFEST}") or fs.isdir(f"{root}/shards"))
    except (ValueError, ImportError, OSError):
        return False


def read_manifest(url: str) -> tuple[dict, str]:
    """(the manifest of the store at `url`, the sha256 of its bytes: the store's identity).
    ValueError naming the store when it is half-written or not a store of this format."""
    fs, root = fsspec.core.url_to_fs(url)
    try:
        raw = fs.cat_file(f"{root.rstrip('/')}/{MANIFEST}")
    except FileNotFoundError:
        raise ValueError(
            f"token store {url} is half-written (it has shards but no {MANIFEST}): run "
            f"`hyla data prepare --out {url}` with the same data.* keys again to finish it"
        ) from None
    try:
        manifest = json.loads(raw)
    except ValueError:
        manifest = None
    ours = isinstance(manifest, dict) and manifest.get("format") == FORMAT
    if not ours or manifest.get("version") != VERSION:
        older = ours
        why = (
            f"it was prepared by an earlier hyla (format version {manifest.get('version')}, "
            f"this one reads {VERSION}); prepare it again with `hyla data prepare`"
            if older
            else f"it is not a {FORMAT} manifest"
        )
        raise ValueError(f"token store {url}: {MANIFEST}: {why}")
    return manifest, sha256(raw)


class TokenStore:
    """A token store, read by token range: `tokens(begin, end)`. Opening it reads the
    manifest only; a shard's record (its block hashes) is read when one of its tokens is
    first wanted, and each block is checked against its hash before its first use. Pickles
    without its open files (loader workers reopen them)."""

    def __init__(self, url: str, cache_mb: int = 256) -> None:
        self.url = url.rstrip("/")
        self.manifest, self.identity = read_manifest(self.url)
        self.dtype = np.dtype(self.manifest["dtype"])
        shards = self.manifest["shards"]
        self.starts = np.cumsum([0] + [s["num_tokens"] for s in shards])
        self.doc_starts = np.cumsum([0] + [s["num_documents"] for s in shards])
        self.cache_bytes = cache_mb << 20
        self._reset()

    def _reset(self) -> None:
        self._fs: Any = None
        self._root = ""
        self._records: dict[int, dict] = {}
        self._maps: dict[int, np.ndarray] = {}
        self._verified: set[tuple[int, int]] = set()
        self._cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._cached_bytes = 0

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_fs", "_records", "_maps", "_verified", "_cache"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def num_documents(self) -> int:
        return int(self.doc_starts[-1])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["tokenizer"]["eos_id"])

    def shard_path(self, index: int, suffix: str) -> str:
        self._filesystem()
        return f"{self._root}/{shard_name(index)}.{suffix}"

    def _filesystem(self) -> Any:
        if self._fs is None:
            self._fs, root = fsspec.core.url_to_fs(self.url)
            self._root = root.rstrip("/")
        return self._fs

    def tokens(self, begin: int, end: int) -> np.ndarray:
        """Tokens [begin, end) of the stream, as int64."""
        if not 0 <= begin <= end <= len(self):
            raise IndexError(f"tokens [{begin}, {end}) of a store of {len(self)} tokens")
        return self.read(self.starts, None, begin, end)

    def read(
        self, offsets: np.ndarray, first_token: np.ndarray | None, begin: int, end: int
    ) -> np.ndarray:
        """Tokens [begin, end), as int64, of a stream made of one range of each shard: shard
        s's tokens from first_token[s] on (None: from its start), at offset offsets[s] of the
        stream. The store's own stream, or one of its parts."""
        parts = []
        shard = int(np.searchsorted(offsets, begin, side="right")) - 1
        while begin < end:
            stop = min(end, int(offsets[shard + 1]))
            if stop > begin:
                skip = 0 if first_token is None else int(first_token[shard])
                lo = skip + begin - int(offsets[shard])
                parts.append(self._shard_tokens(shard, lo, lo + stop - begin))
            begin, shard = stop, shard + 1
        return np.concatenate(parts, dtype=np.int64) if parts else np.zeros(0, dtype=np.int64)

    def part(self, validation: bool) -> StorePart:
        """The store's training documents, or its validation documents, as one stream."""
        return StorePart(self, validation)

    def _record(self, shard: int) -> dict:
        if shard not in self._records:
            entry = self.manifest["shards"][shard]
            raw = self._filesystem().cat_file(self.shard_path(shard, "json"))
            if sha256(raw) != entry["record_sha256"]:
                raise ValueError(self._corrupt(shard, "json", "its record fails its hash"))
            self._records[shard] = json.loads(raw)
        return self._records[shard]

    def doc_ends(self, shard: int) -> np.ndarray:
        """Where each document of a shard ends (token offsets in the shard), verified."""
        raw = self._filesystem().cat_file(self.shard_path(shard, "docs"))
        if sha256(raw) != self._record(shard)["docs_sha256"]:
            raise ValueError(self._corrupt(shard, "docs", "it fails its hash"))
        return np.frombuffer(raw, dtype="<i8")

    def _shard_tokens(self, shard: int, lo: int, hi: int) -> np.ndarray:
        """Tokens [lo, hi) of a shard: only their bytes of each (verified) block are taken,
        without copying a local block."""
        size = self.dtype.itemsize
        start, end = lo * size, hi * size
        pieces = []
        for b in range(start // BLOCK_BYTES, (end - 1) // BLOCK_BYTES + 1):
            block = memoryview(self._block(shard, b))
            base = b * BLOCK_BYTES
            pieces.append(block[max(start, base) - base : min(end, base + BLOCK_BYTES) - base])
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        return np.frombuffer(data, dtype=self.dtype, count=hi - lo)

    def _block(self, shard: int, block: int) -> memoryview | bytes:
        """Block `block` of a shard's tokens, checked against its hash at its first use."""
        key = (shard, block)
        if isinstance(self._filesystem(), LocalFileSystem):
            mapped = self._local_map(shard)[block * BLOCK_BYTES : (block + 1) * BLOCK_BYTES]
            data: memoryview | bytes = mapped.data
        elif key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        else:
            start = block * BLOCK_BYTES
            end = min(start + BLOCK_BYTES, self._record(shard)["tokens_bytes"])
            data = self._fs.cat_file(self.shard_path(shard, "tokens"), start=start, end=end)
        if key not in self._verified:
            expected = self._record(shard)["block_sha256"]
            if block >= len(expected) or sha256(data) != expected[block]:
                raise ValueError(self._corrupt(shard, "tokens", f"block {block} fails its hash"))
            self._verified.add(key)
        if not isinstance(self._fs, LocalFileSystem):
            self._remember(key, bytes(data))
        return data

    def _local_map(self, shard: int) -> np.ndarray:
        if shard not in self._maps:
            path = self.shard_path(shard, "tokens")
            expected = self.manifest["shards"][shard]["tokens_bytes"]
            if os.path.getsize(path) != expected:
                raise ValueError(self._corrupt(shard, "tokens", "its size differs"))
            if expected == 0:
                self._maps[shard] = np.zeros(0, dtype=np.uint8)
            else:
                self._maps[shard] = np.memmap(path, dtype=np.uint8, mode="r")
        return self._maps[shard]

    def _remember(self, key: tuple[int, int], data: bytes) -> None:
        """Keep a remote block in the bounded cache, dropping the least recently used."""
        self._cache[key] = data
        self._cached_bytes += len(data)
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            self._cached_bytes -= len(dropped)

    def _corrupt(self, shard: int, suffix: str, why: str) -> str:
        return (
            f"token store {self.url}: shard file {shard_name(shard)}.{suffix} is corrupt "
            f"({why}); prepare the store again (`hyla data prepare` keeps the shards that "
            f"verify and rewrites this one)"
        )

    def check_files(self) -> None:
        """Every shard file is there with the size the manifest gives (no hashing: this is
        the preflight, whose cost must not grow with the corpus' bytes)."""
        fs = self._filesystem()
        try:
            listing = {
                entry["name"].rstrip("/"): entry["size"]
                for entry in fs.ls(f"{self._root}/shards", detail=True)
            }
        except FileNotFoundError:
            listing = {}
        for index, entry in enumerate(self.manifest["shards"]):
            for suffix in ("tokens", "docs", "json"):
                path = self.shard_path(index, suffix)
                want = entry[f"{suffix}_bytes" if suffix != "json" else "record_bytes"]
                have = listing.get(path, listing.get(fs._strip_protocol(path)))
                if have is None:
                    raise ValueError(
                        f"token store {self.url}: shard file {shard_name(index)}.{suffix} "
                        f"is missing; prepare the store again"
                    )
                if have != want:
                    raise ValueError(
                        self._corrupt(index, suffix, f"{have} bytes, the manifest says {want}")
                    )


class StorePart:
    """One side of a store's split, read as one stream: the training documents of every
    shard (each shard's first tokens), or the validation documents (its last), concatenated
    in shard order. Memory per part: a few numbers per shard."""

    def __init__(self, store: TokenStore, validation: bool) -> None:
        self.store = store
        shards = store.manifest["shards"]
        held = np.array([s["val_tokens"] for s in shards], dtype=np.int64)
        held_docs = np.array([s["val_documents"] for s in shards], dtype=np.int64)
        sizes = np.diff(store.starts)
        docs = np.diff(store.doc_starts)
        # where this part begins within each shard, in tokens and in documents
        self.first_token = sizes - held if validation else np.zeros_like(sizes)
        self.first_doc = docs - held_docs if validation else np.zeros_like(docs)
        lengths, counts = (held, held_docs) if validation else (sizes - held, docs - held_docs)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.doc_offsets = np.concatenate([[0], np.cumsum(counts)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_documents(self) -> int:
        return int(self.doc_offsets[-1])

    def tokens(self, begin: int, end: int) -> np.ndarray:
        """Tokens [begin, end) of the part, as int64."""
        if not 0 <= begin <= end <= len(self):
            raise IndexError(f"tokens [{begin}, {end}) of a part of {len(self)} tokens")
        return self.store.read(self.offsets, self.first_token, begin, end)

    def documents_end(self, count: int) -> int:
        """The token offset in the part where its first `count` documents end (all of them
        at most)."""
        count = min(count, self.num_documents)
        if count == 0:
            return 0
        shard = int(np.searchsorted(self.doc_offsets, count, side="left")) - 1
        ends = self.store.doc_ends(shard)
        last = ends[self.first_doc[shard] + count - self.doc_offsets[shard] - 1]
        return int(self.offsets[shard] + last - self.first_token[shard])
