"""Atomic checkpoints on any fsspec URL (a local path, file://, memory://, s3://, ...).

Layout under the store's URL:

    step-00000020/                 a checkpoint, complete once COMMITTED is there
        dcp/.metadata, dcp/*.distcp    tensors, written by torch.distributed.checkpoint
        shared.json                    written once, by rank 0
        rank-00000.json, ...           one per rank
        COMMITTED                      written last: {step, world_size, time,
                                       files: {path: {size, sha256}}}
    step-00000040.tmp-<id>/        a save in progress, or the remains of an interrupted one

A save writes everything under the temporary name, hashing each file's bytes (SHA-256) as
they are written, so the hashes cost no extra read. Once every rank's files are on storage,
rank 0 renames the directory and writes COMMITTED into it. The marker is the commit: a
directory without one (an interrupted save, or a rename cut short) is partial, and one whose
files do not match the marker's list (sizes at listing, hashes at loading) is corrupt. On
object stores the rename is a server-side copy of every object.

Resuming (`load_latest`) takes the newest checkpoint that verifies and loads: one that is
partial, corrupt, refused (an unsafe pickle) or fails to decode is skipped with a warning
naming the file, and the one before it is tried. Only when none loads is it an error.

Loading never unpickles arbitrary objects. DCP's `.metadata` pickle goes through an
unpickler that only knows the classes DCP metadata is made of; the tensors and DCP's
non-tensor values (optimizer param_groups, ...) go through `torch.load(weights_only=True)`.
`shared` and `per_rank` are JSON (see `hyla.platform.state_json`). Reading and writing DCP's
files goes through `hyla.platform.dcp_storage`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pickle import UnpicklingError
from typing import Any, TypeVar

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from torch.distributed.checkpoint import CheckpointException

from hyla.platform.dcp_storage import (
    HASH,
    HashingFsspecWriter,
    SafeFsspecReader,
    SafeLoadPlanner,
    UnsafeCheckpointError,
)
from hyla.platform.state_json import dumps_state, loads_state

__all__ = [
    "CheckpointStore",
    "CheckpointWarning",
    "IncompleteCheckpointError",
    "NoLoadableCheckpointError",
    "UnsafeCheckpointError",
    "step_of_directory",
]

MARKER = "COMMITTED"
SHARED = "shared.json"
DCP_DIR = "dcp"
_COMMITTED_NAME = re.compile(r"step-(\d+)")
_TEMP_NAME = re.compile(r"step-(\d+)\.tmp-[0-9a-f]+")
_READ_CHUNK = 8 << 20
_T = TypeVar("_T")


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (partial or corrupt) or could not be cleaned up."""


class IncompleteCheckpointError(ValueError):
    """The checkpoint is partial (no commit marker) or corrupt (files differ from the marker)."""


class NoLoadableCheckpointError(ValueError):
    """A run has checkpoints, but not one of them verifies and loads."""


# ------------------------------------------------------------------------ collectives


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if _distributed():
        return dist.get_rank(group), dist.get_world_size(group)
    if group is not None:
        raise ValueError("group was given but torch.distributed is not initialised")
    return 0, 1


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every call without torch.distributed that it assumes one process: here
    that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        yield


def _on_every_rank(fn: Callable[[], _T], group: dist.ProcessGroup | None) -> list[_T]:
    """Runs fn on this rank and gathers the results; if it failed on any rank, every rank
    raises (the failing one its own error), so that no rank waits forever in a later
    collective."""
    error: Exception | None = None
    result = None
    try:
        result = fn()
    except Exception as e:
        error = e
    outcome = (result, None if error is None else f"{type(error).__name__}: {error}")
    outcomes: list[Any] = [outcome]  # each rank's (result, error message)
    if _distributed():
        outcomes = [None] * dist.get_world_size(group)
        dist.all_gather_object(outcomes, outcome, group=group)
    if error is not None:
        raise error
    failed = [f"rank {r}: {message}" for r, (_, message) in enumerate(outcomes) if message]
    if failed:
        raise RuntimeError("checkpoint save failed on " + "; ".join(failed))
    return [r for r, _ in outcomes]


# ------------------------------------------------------------------------------ the store


def _check_step(step: Any) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")


def _dir_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of_directory(name: str) -> int | None:
    """The step of a complete checkpoint's directory name (step-00000042 -> 42), else None."""
    match = _COMMITTED_NAME.fullmatch(name.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def _hash_bytes(data: bytes) -> str:
    return hashlib.new(HASH, data).hexdigest()


class CheckpointStore:
    """Checkpoints of one training run under `url` (any fsspec URL), keeping the newest
    `keep_last` complete ones. `storage_options` go to fsspec (e.g. s3fs's
    {"client_kwargs": {"endpoint_url": ...}}).

    `save` and `load` are collective when torch.distributed is initialised: every rank of
    `group` (default: the world) calls them. `latest` and `steps` only read.
    """

    def __init__(self, url: str, keep_last: int, storage_options: dict | None = None) -> None:
        if not isinstance(url, str) or not url:
            raise ValueError(f"url must be a non-empty fsspec URL or path, got {url!r}")
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an integer >= 1, got {keep_last!r}")
        if storage_options is not None and not isinstance(storage_options, dict):
            raise ValueError(f"storage_options must be a dict or None, got {storage_options!r}")
        self.keep_last = keep_last
        self.storage_options = dict(storage_options or {})
        self.fs, root = url_to_fs(url, **self.storage_options)
        self.root = root.rstrip("/")
        self.url = url.rstrip("/")  # as the caller spells it, in returned URLs and messages
        self._local = isinstance(self.fs, LocalFileSystem)

    def url_of(self, step: int) -> str:
        """Where the checkpoint of `step` lives (once committed)."""
        _check_step(step)
        return f"{self.url}/{_dir_name(step)}"

    # -------------------------------------------------------------------- save

    def save(
        self,
        step: int,
        tensors: dict[str, Any],
        shared: dict,
        per_rank: dict,
        group: dist.ProcessGroup | None = None,
    ) -> str:
        """Writes and commits the checkpoint of `step`; returns its URL.

        tensors: nested state dicts of tensors (model and optimizer, e.g. from
            torch.distributed.checkpoint.state_dict.get_state_dict), saved with DCP, which
            reshards them at load. Non-tensor leaves (param_groups) are allowed.
        shared: state every rank has (step, scheduler, MLflow run id, ...); rank 0's is kept.
        per_rank: this rank's own state (data loader, RNG states); see
            `hyla.platform.state_json.to_jsonable`.

        A complete checkpoint of the same step is replaced. After the commit, complete
        checkpoints beyond the newest `keep_last` and every partial one are deleted (never
        the one just written).
        """
        _check_step(step)
        rank, world = _rank_world(group)
        texts: dict[str, str] = {}

        def encode() -> str:
            texts[_rank_file(rank)] = dumps_state(per_rank, "per_rank")
            if rank == 0:
                texts[SHARED] = dumps_state(shared, "shared")
            return uuid.uuid4().hex[:12]

        save_id = _on_every_rank(encode, group)[0]  # rank 0's id names the temporary dir
        temp = f"{self.root}/{_dir_name(step)}.tmp-{save_id}"
        writer = HashingFsspecWriter(
            self.fs.unstrip_protocol(f"{temp}/{DCP_DIR}"),
            sync_files=self._local,  # elsewhere fsync is os.sync() of the whole machine
            **self.storage_options,
        )
        with _quiet_single_process():
            dcp.save(
                tensors, storage_writer=writer, process_group=group, no_dist=not _distributed()
            )

        def write_texts() -> dict[str, str | None]:
            digests = {self._relative(temp, p): d for p, d in writer.digests.items()}
            return digests | self._write_texts(temp, texts)

        everyone = _on_every_rank(write_texts, group)
        digests = {path: digest for mine in everyone for path, digest in mine.items()}
        _on_every_rank(
            lambda: self._commit(temp, step, world, digests) if rank == 0 else None, group
        )
        return self.url_of(step)

    def _relative(self, directory: str, path: str) -> str:
        """A path under `directory` (as fsspec or DCP spells it), relative to it."""
        stripped = self.fs._strip_protocol(path)
        if not stripped.startswith(directory + "/"):
            raise ValueError(f"{path} is not under the checkpoint directory {directory}")
        return stripped[len(directory) + 1 :]

    def _write_texts(self, directory: str, texts: dict[str, str]) -> dict[str, str]:
        """Writes each text into `directory`; returns {name: hash}."""
        digests = {}
        for name, text in texts.items():
            data = text.encode()
            with self.fs.open(f"{directory}/{name}", "wb") as f:
                f.write(data)
                if self._local:
                    f.flush()
                    os.fsync(f.fileno())
            digests[name] = _hash_bytes(data)
        return digests

    def _commit(self, temp: str, step: int, world: int, digests: dict[str, str | None]) -> None:
        final = f"{self.root}/{_dir_name(step)}"
        self.fs.invalidate_cache()
        if self.fs.exists(final):
            self.fs.rm(final, recursive=True)
        self._rename(temp, final)
        self.fs.invalidate_cache()
        files = {
            path: {"size": size, HASH: digests.get(path) or self._hash_file(f"{final}/{path}")}
            for path, size in self._sizes(final).items()
        }
        marker = {
            "step": step,
            "world_size": world,
            "time": datetime.now(timezone.utc).isoformat(),
            "files": files,
        }
        self._write_texts(final, {MARKER: json.dumps(marker, indent=1)})
        self._prune(keep=_dir_name(step))

    def _hash_file(self, path: str) -> str:
        digest = hashlib.new(HASH)
        with self.fs.open(path, "rb") as f:
            while chunk := f.read(_READ_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def _rename(self, source: str, target: str) -> None:
        """One atomic rename on a local disk; elsewhere a copy of each file (server-side on
        object stores), then the source is deleted."""
        if self._local:
            self.fs.mv(source, target)
            return
        files = self.fs.find(source)
        self.fs.copy(files, [target + path[len(source) :] for path in files])
        self.fs.rm(source, recursive=True)

    def _sizes(self, directory: str) -> dict[str, int]:
        found = self.fs.find(directory, detail=True)
        return {path[len(directory) + 1 :]: info["size"] for path, info in found.items()}

    def _prune(self, keep: str) -> None:
        complete: list[str] = []
        doomed: list[str] = []
        for entry in self._entries():  # newest first
            (doomed if self._problem(*entry) else complete).append(entry[1])
        doomed += [name for name in complete[self.keep_last :] if name != keep]
        for name in doomed:
            try:
                self.fs.rm(f"{self.root}/{name}", recursive=True)
            except OSError as e:
                warnings.warn(
                    f"could not delete {self.url}/{name}: {e}", CheckpointWarning, stacklevel=3
                )

    # ------------------------------------------------------------------ query

    def _entries(self) -> list[tuple[int, str, bool]]:
        """(step, directory name, is temporary) of every checkpoint directory, newest first."""
        self.fs.invalidate_cache()
        try:
            paths = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        entries = []
        for path in paths:
            name = path.rstrip("/").rsplit("/", 1)[-1]
            for pattern, temporary in ((_COMMITTED_NAME, False), (_TEMP_NAME, True)):
                if match := pattern.fullmatch(name):
                    entries.append((int(match.group(1)), name, temporary))
        return sorted(entries, key=lambda e: (e[0], not e[2]), reverse=True)

    def _marker(self, name: str, step: int) -> dict:
        """The commit marker of the complete checkpoint in directory `name`; raises
        IncompleteCheckpointError saying why if it is partial or corrupt."""
        where = f"checkpoint {self.url}/{name}"
        directory = f"{self.root}/{name}"
        try:
            marker = json.loads(self.fs.cat_file(f"{directory}/{MARKER}"))
            files, world, marked_step = marker["files"], marker["world_size"], marker["step"]
        except FileNotFoundError:
            raise IncompleteCheckpointError(
                f"{where} is partial: it has no {MARKER} marker (an unfinished save)"
            ) from None
        except (ValueError, KeyError, TypeError) as e:
            raise IncompleteCheckpointError(
                f"{where} is corrupt: its {MARKER} marker is unreadable ({type(e).__name__}: {e})"
            ) from None
        if marked_step != step or not isinstance(files, dict) or not isinstance(world, int):
            raise IncompleteCheckpointError(
                f"{where} is corrupt: its {MARKER} marker does not describe step {step}"
            )
        sizes = self._sizes(directory)
        for path, entry in files.items():
            size = entry["size"] if isinstance(entry, dict) else entry  # older: size only
            if path not in sizes:
                raise IncompleteCheckpointError(f"{where} is corrupt: {path} is missing")
            if sizes[path] != size:
                raise IncompleteCheckpointError(
                    f"{where} is corrupt: {path} has {sizes[path]} bytes, {MARKER} says {size}"
                )
        return marker

    def _verify(self, name: str, marker: dict, group: dist.ProcessGroup | None) -> None:
        """Every file's hash against the marker, the files shared out over the ranks; raises
        IncompleteCheckpointError on every rank if any file differs."""
        rank, world = _rank_world(group)
        entries = sorted(marker["files"].items())
        mine = [(path, entry) for i, (path, entry) in enumerate(entries) if i % world == rank]

        def check() -> None:
            for path, entry in mine:
                expected = entry.get(HASH) if isinstance(entry, dict) else None
                if (
                    expected is not None
                    and self._hash_file(f"{self.root}/{name}/{path}") != expected
                ):
                    raise IncompleteCheckpointError(
                        f"checkpoint {self.url}/{name} is corrupt: {path} does not match its "
                        f"{HASH} in {MARKER}"
                    )

        try:
            _on_every_rank(check, group)
        except RuntimeError as e:  # another rank found the corrupt file
            raise IncompleteCheckpointError(str(e)) from None

    def _problem(self, step: int, name: str, temporary: bool) -> str | None:
        """Why a checkpoint directory cannot be loaded; None if it is complete."""
        if temporary:
            return f"checkpoint {self.url}/{name} is partial: an unfinished save"
        try:
            self._marker(name, step)
        except IncompleteCheckpointError as e:
            return str(e)
        return None

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        return sorted(e[0] for e in self._entries() if self._problem(*e) is None)

    def shared_state(self, step: int) -> dict:
        """The shared state of a complete checkpoint, read on its own (not verified: for
        planning a resume, not for loading one)."""
        return loads_state(self.fs.cat_file(f"{self.root}/{_dir_name(step)}/{SHARED}"))

    def latest(self) -> int | None:
        """The newest complete checkpoint's step (None if there is none). Each newer partial
        or corrupt one is skipped with a CheckpointWarning (warnings.warn) saying why."""
        for entry in self._entries():
            problem = self._problem(*entry)
            if problem is None:
                return entry[0]
            warnings.warn(f"{problem}; skipping it", CheckpointWarning, stacklevel=2)
        return None

    # -------------------------------------------------------------------- load

    def load(
        self, step: int, tensors: dict[str, Any], group: dist.ProcessGroup | None = None
    ) -> tuple[dict, dict | None]:
        """Loads the DCP tensors of `step` in place into `tensors` (same structure as saved;
        DCP reshards, also onto another number of ranks) and returns (shared, this rank's
        per_rank), per_rank being None when the checkpoint was written by another number of
        ranks: per-rank state does not carry over."""
        _check_step(step)
        rank, world = _rank_world(group)
        name = _dir_name(step)
        self.fs.invalidate_cache()
        if not self.fs.exists(f"{self.root}/{name}"):
            raise ValueError(
                f"step {step} has no checkpoint under {self.url}; complete ones: {self.steps()}"
            )
        marker = self._marker(name, step)
        same_world = marker["world_size"] == world
        self._verify(name, marker, group)
        directory = f"{self.root}/{name}"
        reader = SafeFsspecReader(
            self.fs.unstrip_protocol(f"{directory}/{DCP_DIR}"), **self.storage_options
        )
        try:  # a clear error before DCP wraps it in its own
            reader.read_metadata()
        except UnsafeCheckpointError:
            raise
        except Exception as e:  # garbage that unpickles to nothing, or not at all
            raise IncompleteCheckpointError(
                f"checkpoint {self.url}/{name} is corrupt: {DCP_DIR}/.metadata does not "
                f"decode ({type(e).__name__}: {e})"
            ) from None
        try:
            with _quiet_single_process():
                dcp.load(
                    tensors,
                    storage_reader=reader,
                    planner=SafeLoadPlanner(),
                    process_group=group,
                    no_dist=not _distributed(),
                )
        except CheckpointException as e:  # a BaseException: DCP's wrapper of every rank's error
            refused = [exc for exc, _ in e.failures.values() if isinstance(exc, UnpicklingError)]
            if refused:
                raise UnsafeCheckpointError(
                    f"checkpoint {self.url}/{name} holds a value that is neither a tensor nor "
                    f"plain data; refusing to unpickle it: {refused[0]}"
                ) from e
            raise IncompleteCheckpointError(
                f"checkpoint {self.url}/{name} could not be read: {e}"
            ) from e

        decoded: list[tuple[dict, dict | None]] = []

        def decode() -> None:
            shared = loads_state(self.fs.cat_file(f"{directory}/{SHARED}"))
            mine = self.fs.cat_file(f"{directory}/{_rank_file(rank)}") if same_world else None
            decoded.append((shared, None if mine is None else loads_state(mine)))

        try:
            _on_every_rank(decode, group)  # every rank agrees whether the state decodes
        except (ValueError, RuntimeError) as e:
            raise IncompleteCheckpointError(
                f"checkpoint {self.url}/{name} has state that does not decode: {e}"
            ) from None
        return decoded[0]

    def load_latest(
        self, tensors: dict[str, Any], group: dist.ProcessGroup | None = None
    ) -> tuple[int, dict, dict | None] | None:
        """Loads the newest checkpoint that verifies and loads (as `load`, collective):
        (its step, shared, this rank's per_rank), or None when the run has no checkpoint.
        Each newer one that is partial, corrupt, refused or does not decode is skipped with
        a CheckpointWarning naming why; NoLoadableCheckpointError when none loads."""
        skipped: list[str] = []
        for step, name, temporary in self._entries():
            problem = self._problem(step, name, temporary)
            if problem is None:
                try:
                    return step, *self.load(step, tensors, group)
                except (IncompleteCheckpointError, UnsafeCheckpointError) as e:
                    problem = str(e)
            skipped.append(problem)
            warnings.warn(f"{problem}; trying an older one", CheckpointWarning, stacklevel=2)
        if skipped:
            raise NoLoadableCheckpointError(
                f"no checkpoint under {self.url} loads; " + "; ".join(skipped)
            )
        return None
