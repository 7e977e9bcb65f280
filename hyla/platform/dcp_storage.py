"""The storage under torch.distributed.checkpoint (DCP): hyla's reader, load planner and
writer, built on DCP's (private) fsspec storage classes.

Reading never unpickles arbitrary objects: `SafeFsspecReader` reads DCP's `.metadata` pickle
through an unpickler that only knows the classes DCP metadata is made of, and
`SafeLoadPlanner` loads DCP's non-tensor values (optimizer param_groups, ...) with
`torch.load(weights_only=True)`. Anything else is refused with `UnsafeCheckpointError`
before it runs.

Writing hashes: `HashingFsspecWriter` records the `HASH` of every file's bytes as they are
written, so the hashes cost no extra read.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from fsspec import AbstractFileSystem
from torch.distributed.checkpoint._fsspec_filesystem import (
    FileSystem,
    FsspecReader,
    FsspecWriter,
)
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

HASH = "sha256"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds a pickle that would build more than plain data (classes other
    than DCP metadata's, or calls such as os.system); it is refused before anything runs."""


# ------------------------------------------------------- reading without arbitrary pickles

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_SAFE_GLOBALS = {
    (_METADATA_MODULE, name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a layout up by name, e.g. "torch.strided"
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals DCP metadata is made of (dataclasses, torch.Size, dtypes and
    layouts); any other global, such as os.system, raises before anything is called."""

    def __init__(self, file: io.IOBase, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.source} asks to load the global {module}.{name}, which DCP metadata never "
            f"contains; refusing to unpickle it (allowed: the classes of {_METADATA_MODULE}, "
            "torch.Size, torch dtypes and layouts)"
        )


class SafeFsspecReader(FsspecReader):
    """DCP's fsspec reader, reading `.metadata` through the restricted unpickler."""

    def read_metadata(self) -> Metadata:
        """Only the global `.metadata` (no `rank` keyword: DCP then never falls back to
        per-rank metadata files), through the restricted unpickler."""
        path = self.fs.concat_path(self.path, ".metadata")
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream, str(path)).load()
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path} holds a {type(metadata).__name__}, not Metadata")
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, unpickling non-tensor values with weights_only=True."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """As DefaultLoadPlanner, with weights_only=True (it unpickles with weights_only=False)."""
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


# -------------------------------------------------------------------- writing with hashes


class _HashingStream:
    """A write stream that hashes the bytes going through it. A seek would break the
    running hash: the file is then marked for hashing from storage after it is written."""

    def __init__(self, stream: Any, path: str, errors: list[tuple[str, OSError]]) -> None:
        self._stream, self.digest, self.sequential = stream, hashlib.new(HASH), True
        self._path, self._errors = path, errors

    def write(self, data: Any) -> int:
        """Writes all of `data`: a raw stream may take part of it (a disk filling up takes
        what fits), and the next write then raises the OSError that says why. That error is
        also kept in `errors`: torch.save, writing through this stream, reports only a
        position mismatch in its place."""
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                written = self._stream.write(view[done:])
                step = len(view) - done if written is None else written
                self.digest.update(view[done : done + step])
                done += step
        except OSError as e:
            self._errors.append((self._path, e))
            raise
        return done

    def seek(self, *args: Any) -> int:
        self.sequential = False
        return self._stream.seek(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _HashingFileSystem(FileSystem):
    """DCP's filesystem object on the fsspec filesystem `fs`, recording a hash of every file
    written through it (None when a seek made the running hash unusable); renames carry the
    hash along."""

    def __init__(self, fs: AbstractFileSystem | None) -> None:
        super().__init__()
        self.fs = fs
        self.digests: dict[str, str | None] = {}
        self.write_errors: list[tuple[str, OSError]] = []  # (path, what a write raised)

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        with super().create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            hashing = _HashingStream(stream, os.fspath(path), self.write_errors)
            yield hashing
        self.digests[os.fspath(path)] = hashing.digest.hexdigest() if hashing.sequential else None

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)
        self.digests[os.fspath(new_path)] = self.digests.pop(os.fspath(path), None)


class HashingFsspecWriter(FsspecWriter):
    """DCP's fsspec writer, recording the `HASH` of every file it writes: `digests` maps each
    path, as DCP spells it, to its hex digest, or to None where the file was not written
    front to back (it must then be hashed from storage)."""

    def __init__(self, path: str, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        # DCP's writers declare `fs` as its local-disk FileSystem; FsspecWriter puts its
        # fsspec FileSystem there, and this writer a hashing one on the same fsspec filesystem.
        self._hashing = _HashingFileSystem(cast(FileSystem, self.fs).fs)
        self.fs = self._hashing  # type: ignore[assignment]

    @property
    def digests(self) -> dict[str, str | None]:
        return self._hashing.digests

    @property
    def write_errors(self) -> list[tuple[str, OSError]]:
        """(path, OSError) of each write the storage refused while DCP wrote: DCP may report
        another error in its place."""
        return self._hashing.write_errors
