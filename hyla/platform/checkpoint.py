"""Atomic checkpoints on any fsspec URL (a local path, file://, memory://, s3://, ...).

Layout under the store's URL:

    step-00000020/                 a checkpoint, complete once COMMITTED is there
        dcp/.metadata, dcp/*.distcp    tensors, written by torch.distributed.checkpoint
        shared.json                    written once, by rank 0
        rank-00000.json, ...           one per rank
        COMMITTED                      written last: {step, world_size, time,
                                       files: {path: {size, sha256}}}
    step-00000040.tmp-<id>/        a save in progress, or the remains of an interrupted one
    step-00000020.replaced-<id>/   a checkpoint that a new save of its step replaces, kept
                                   whole until the new one is in place

    quarantine/step-00000010/      a checkpoint that failed to verify, moved aside whole, with
        QUARANTINED                    why it failed

A save writes everything under the temporary name, hashing each file's bytes (SHA-256) as
they are written, so the hashes cost no extra read. Once every rank's files are on storage,
rank 0 writes COMMITTED into the temporary directory (under a temporary name renamed in turn,
so that a marker is whole or absent), reads the checkpoint back, and renames the directory
into place. The marker under the checkpoint's own name is the commit: a directory without
one (an interrupted save, or a copy cut short) is partial. On object stores each rename is a
server-side copy of every object, the marker last.

A checkpoint verifies when its marker describes it and every file matches: the marker lists
every file of the directory, each with its size and hash, and no other; the directory holds
exactly those files, with those sizes and hashes. Nothing in the marker can switch a check
off: an entry without a hash, a marker listing no files or lacking a rank's file, and a file
the marker does not list each fail, as does a marker that does not parse. Any failure is a
reason (IncompleteCheckpointError), never a crash.

Every reader asks the same question, the newest checkpoint that verifies: resuming
(`load_latest`, which also needs it to load: one refused as an unsafe pickle or that fails to
decode is skipped as well), planning a resume (`latest`, `shared_state`), and the
after-training commands. Newer ones that fail are skipped with a warning naming the file.
When a run has checkpoints and none verifies, that is NoLoadableCheckpointError, naming each
one's reason, and nothing is deleted.

The save reads the new checkpoint back and verifies it before anything older goes, a
checkpoint of the same step included: if it fails, it is quarantined and the save fails.
Pruning then counts only checkpoints that verify: it keeps the newest `keep_last` of them,
moves every committed one that fails to quarantine/ (never deleting it), and deletes
unfinished saves. A crash between setting a checkpoint of the same step aside and renaming
the new one into place (two renames on a local disk) leaves the old one whole as
`step-N.replaced-<id>`; the run's next start (`restore_set_aside`, before it resumes) renames
it back to `step-N` if it verifies, or deletes it where the new one took its place.

A save that fails removes its unfinished directory. One that finds its storage full (ENOSPC,
EDQUOT) is StorageFullError naming the file, the bytes needed and those free: under DCP,
torch.save reports only a position mismatch, so the writer keeps the OSError its stream saw.

Loading never unpickles arbitrary objects. DCP's `.metadata` pickle goes through an
unpickler that only knows the classes DCP metadata is made of; the tensors and DCP's
non-tensor values (optimizer param_groups, ...) go through `torch.load(weights_only=True)`.
`shared` and `per_rank` are JSON (see `hyla.platform.state_json`). Reading and writing DCP's
files goes through `hyla.platform.dcp_storage`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pickle import UnpicklingError
from typing import Any, TypeVar

import torch
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
    "StorageFullError",
    "UnsafeCheckpointError",
    "step_of_directory",
]

MARKER = "COMMITTED"
SHARED = "shared.json"
DCP_DIR = "dcp"
_COMMITTED_NAME = re.compile(r"step-(\d+)")
_TEMP_NAME = re.compile(r"step-(\d+)\.tmp-[0-9a-f]+")
_SET_ASIDE_NAME = re.compile(r"step-(\d+)\.replaced-[0-9a-f]+")
_HEX_DIGEST = re.compile(rf"[0-9a-f]{{{2 * hashlib.new(HASH).digest_size}}}")
QUARANTINE = "quarantine"
QUARANTINE_REASON = "QUARANTINED"
_READ_CHUNK = 8 << 20
_T = TypeVar("_T")


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (partial or corrupt) or could not be cleaned up."""


class IncompleteCheckpointError(ValueError):
    """The checkpoint is partial (no commit marker) or corrupt (files differ from the marker)."""


class NoLoadableCheckpointError(ValueError):
    """A run has checkpoints, but not one of them verifies and loads."""


class StorageFullError(RuntimeError):
    """A save found its storage full (ENOSPC, or EDQUOT: a quota). Not a transient fault: a
    restart would fill it again, so a job ends on it instead of retrying."""


_FULL = (errno.ENOSPC, errno.EDQUOT)


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


def _full_storage(
    error: BaseException, write_errors: list[tuple[str, OSError]]
) -> tuple[str | None, OSError] | None:
    """(the file, the OSError) if `error` came from a storage that is full: an ENOSPC or
    EDQUOT that a write under DCP kept (torch.save reports a position mismatch in its
    place), or one in `error`'s chain or among DCP's per-rank failures; else None."""
    for path, written in write_errors:
        if written.errno in _FULL:
            return path, written
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL:
            return (None if e.filename is None else str(e.filename)), e
        pending += [e.__cause__, e.__context__]
        if isinstance(e, CheckpointException):
            pending += [failure for failure, _ in e.failures.values()]
    return None


def _tensor_bytes(tree: Any) -> int:
    """The bytes of the tensors in a nested state dict, as this rank holds them (a DTensor's
    local shard)."""
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_tensor_bytes(v) for v in tree)
    if isinstance(tree, torch.Tensor):
        local = tree.to_local() if hasattr(tree, "to_local") else tree
        return local.numel() * local.element_size()
    return 0


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


def _sync_directory(path: str) -> None:
    """Makes a rename inside local directory `path` durable: POSIX syncs the directory's
    entries apart from the files' contents."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_count(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _marker_problem(marker: Any, step: int) -> str | None:
    """Why a parsed commit marker does not describe a complete checkpoint of `step` (None
    when it does): its step, its number of ranks, and every file with its size and hash,
    DCP's metadata, the shared state and each rank's state among them. The marker cannot
    leave a check out: a missing hash or size is a reason, not a skipped check."""
    if (
        not isinstance(marker, dict)
        or marker.get("step") != step
        or not _is_count(marker.get("world_size"), 1)
    ):
        return f"its {MARKER} marker does not describe step {step} of 1 or more ranks"
    files = marker.get("files")
    if not isinstance(files, dict):
        return (
            f"its {MARKER} marker lists no files ('files' is a {type(files).__name__}, not a "
            f"mapping of each file to its size and {HASH})"
        )
    if not files:
        return f"its {MARKER} marker lists no files"
    for path, entry in files.items():
        if problem := _entry_problem(path, entry):
            return problem
    world = marker["world_size"]
    if world > len(files):
        return f"its {MARKER} marker lists {len(files)} files, too few for {world} ranks"
    required = [f"{DCP_DIR}/.metadata", SHARED, *(_rank_file(r) for r in range(world))]
    missing = [path for path in required if path not in files]
    return f"{missing[0]} is not listed in its {MARKER} marker" if missing else None


def _entry_problem(path: str, entry: Any) -> str | None:
    """Why one file's entry of a commit marker is not {"size": bytes, HASH: hex digest}."""
    if not isinstance(entry, dict):
        return f"{path} has an entry that is not {{size, {HASH}}} in {MARKER} (got {entry!r})"
    if not _is_count(entry.get("size"), 0):
        return f"{path} has no size in {MARKER} (got {entry.get('size')!r})"
    digest = entry.get(HASH)
    if not isinstance(digest, str) or not _HEX_DIGEST.fullmatch(digest):
        return f"{path} has no {HASH} in {MARKER} (got {digest!r})"
    return None


def _listing_problem(files: dict[str, dict], sizes: dict[str, int]) -> str | None:
    """Why the files on storage ({path: size}, the marker aside) differ from the marker's
    list of them; None when they are the same files with the same sizes."""
    missing = sorted(files.keys() - sizes.keys())
    if missing:
        return f"{missing[0]} is missing"
    extra = sorted(sizes.keys() - files.keys())
    if extra:
        return f"{extra[0]} is not listed in its {MARKER} marker"
    for path, entry in sorted(files.items()):
        if sizes[path] != entry["size"]:
            return f"{path} has {sizes[path]} bytes, {MARKER} says {entry['size']}"
    return None


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

        A checkpoint of the same step is replaced (quarantined if it does not verify). After
        the commit the new checkpoint is read back; IncompleteCheckpointError (and it goes to
        quarantine/) if it does not verify. Then checkpoints that verify beyond the newest
        `keep_last` and unfinished saves are deleted (never the one just written), and
        committed ones that do not verify are moved to quarantine/.
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

        def write_texts() -> dict[str, str | None]:
            digests = {self._relative(temp, p): d for p, d in writer.digests.items()}
            return digests | self._write_texts(temp, texts)

        try:
            with _quiet_single_process():
                dcp.save(
                    tensors, storage_writer=writer, process_group=group, no_dist=not _distributed()
                )
            everyone = _on_every_rank(write_texts, group)
            digests = {path: digest for mine in everyone for path, digest in mine.items()}
            _on_every_rank(
                lambda: self._commit(temp, step, world, digests) if rank == 0 else None, group
            )
        except BaseException as e:  # DCP's CheckpointException is one
            # every rank is past its writes (the collectives above raise on all ranks once
            # all have written): the unfinished save goes, and a full storage is named
            if rank == 0:
                self._remove_quietly(temp)
            full = _full_storage(e, writer.write_errors)
            if full is None:
                raise
            raise StorageFullError(self._full_message(step, temp, *full, tensors, texts)) from e
        return self.url_of(step)

    def _remove_quietly(self, directory: str) -> None:
        """Deletes `directory` if it is there; cleanup only, which must not hide the error
        that led to it."""
        with suppress(OSError):
            self.fs.invalidate_cache()
            if self.fs.exists(directory):
                self.fs.rm(directory, recursive=True)

    def _spelled(self, path: str) -> str:
        """A path of this store as a user names it: a plain path on a local disk, else a URL."""
        stripped = self.fs._strip_protocol(path)
        return stripped if self._local else self.fs.unstrip_protocol(stripped)

    def _full_message(
        self,
        step: int,
        temp: str,
        path: str | None,
        error: OSError,
        tensors: dict[str, Any],
        texts: dict[str, str],
    ) -> str:
        """What a save that found its storage full says: the error, the file, the bytes this
        rank's part of the checkpoint needs and, on a local disk, the bytes free."""
        needed = _tensor_bytes(tensors) + sum(len(t.encode()) for t in texts.values())
        free = ""
        if self._local:
            with suppress(OSError):
                free = f", {shutil.disk_usage(self.root).free:,} bytes free there now"
        code = errno.errorcode.get(error.errno or 0, str(error.errno))
        return (
            f"{code}: no space left on the checkpoint storage writing "
            f"{self._spelled(path) if path else self.url}: the checkpoint of step "
            f"{step} needs about {needed:,} bytes from this rank{free}; its unfinished save "
            f"{temp.rsplit('/', 1)[-1]} was removed. Free space, or set checkpoint.dir "
            f"elsewhere, and resume the run"
        )

    def _relative(self, directory: str, path: str) -> str:
        """A path under `directory` (as fsspec or DCP spells it), relative to it."""
        stripped = self.fs._strip_protocol(path)
        if not stripped.startswith(directory + "/"):
            raise ValueError(f"{path} is not under the checkpoint directory {directory}")
        return stripped[len(directory) + 1 :]

    def _write_file(self, path: str, data: bytes) -> str:
        """Writes `data` to `path` (synced to the disk when local); returns its hash. An
        OSError names `path` (a failed write alone does not)."""
        try:
            with self.fs.open(path, "wb") as f:
                f.write(data)
                if self._local:
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as e:
            if e.filename is None:
                e.filename = path
            raise
        return _hash_bytes(data)

    def _write_texts(self, directory: str, texts: dict[str, str]) -> dict[str, str]:
        """Writes each text into `directory`; returns {name: hash}."""
        return {
            name: self._write_file(f"{directory}/{name}", text.encode())
            for name, text in texts.items()
        }

    def _write_whole(self, path: str, data: bytes) -> None:
        """Writes `data` to `path` so that readers find it whole or not at all: under a
        temporary name, then renamed over `path` (os.replace on a local disk, a move
        elsewhere). A write that fails leaves nothing at `path` and removes its temporary."""
        temp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            self._write_file(temp, data)
            if self._local:
                os.replace(temp, path)
                _sync_directory(os.path.dirname(path))
            else:
                self.fs.mv(temp, path)
        except BaseException:
            with suppress(OSError):  # the write's own error is the one to report
                self.fs.rm(temp)
            raise

    def _commit(self, temp: str, step: int, world: int, digests: dict[str, str | None]) -> None:
        """Writes the save's marker into it and reads it back: one that does not verify is
        quarantined and the save fails, with every older checkpoint kept. Only then does the
        save take its place (one of the same step there is set aside until then, and
        deleted after) and is anything older pruned."""
        name = _dir_name(step)
        final = f"{self.root}/{name}"
        self.fs.invalidate_cache()
        files = {
            path: {"size": size, HASH: digests.get(path) or self._hash_file(f"{temp}/{path}")}
            for path, size in self._sizes(temp).items()
        }
        marker = {
            "step": step,
            "world_size": world,
            "time": datetime.now(timezone.utc).isoformat(),
            "files": files,
        }
        self._write_whole(f"{temp}/{MARKER}", json.dumps(marker, indent=1).encode())
        temp_name = temp.rsplit("/", 1)[-1]
        problem = self._problem(step, temp_name, temporary=False)
        if problem is not None:
            self._quarantine(temp_name, problem, as_name=name)
            raise IncompleteCheckpointError(
                f"{problem}: the checkpoint of step {step} did not read back as it was "
                f"written, so it was moved to {self.url}/{QUARANTINE} and every older "
                f"checkpoint is kept"
            )
        previous = self._set_aside(step)
        try:
            self._rename(temp, final)
            if not self._local:  # a copy: every file arrived, at its size (as _marker checks)
                self._marker(name, step)
        except BaseException:
            if previous is not None:  # the one that verified goes back
                with suppress(OSError):
                    self._remove_quietly(final)
                    self._rename(previous, final)
            raise
        if previous is not None:
            self.fs.rm(previous, recursive=True)
        self._prune(keep=name)

    def _set_aside(self, step: int) -> str | None:
        """Clears the place of a new checkpoint of `step` (which verified): one there that
        does not verify is quarantined; one that does is renamed to `step-N.replaced-<id>`,
        which no reader takes for a checkpoint and no pruning deletes, and that name is
        returned. Until the new one is in place, the old one is kept whole."""
        name = _dir_name(step)
        self.fs.invalidate_cache()
        if not self.fs.exists(f"{self.root}/{name}"):
            return None
        problem = self._problem(step, name, temporary=False)
        if problem is not None:
            self._quarantine(name, problem)
            return None
        aside = f"{self.root}/{name}.replaced-{uuid.uuid4().hex[:12]}"
        self._rename(f"{self.root}/{name}", aside)
        return aside

    def _hash_file(self, path: str) -> str:
        digest = hashlib.new(HASH)
        with self.fs.open(path, "rb") as f:
            while chunk := f.read(_READ_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def _rename(self, source: str, target: str) -> None:
        """One atomic rename on a local disk; elsewhere a copy of each file (server-side on
        object stores), a commit marker last, then the source is deleted."""
        if self._local:
            self.fs.mv(source, target)
            return
        files = self.fs.find(source)
        for batch in (
            [path for path in files if not path.endswith(f"/{MARKER}")],
            [path for path in files if path.endswith(f"/{MARKER}")],
        ):
            if batch:
                self.fs.copy(batch, [target + path[len(source) :] for path in batch])
        self.fs.rm(source, recursive=True)

    def _sizes(self, directory: str) -> dict[str, int]:
        found = self.fs.find(directory, detail=True)
        return {path[len(directory) + 1 :]: info["size"] for path, info in found.items()}

    def _prune(self, keep: str) -> None:
        """After the checkpoint in directory `keep` was committed and verified: keeps the
        newest `keep_last` checkpoints that verify (`keep` among them, and always `keep`),
        deletes older ones that verify and every unfinished save, and moves each committed
        one that fails to verify into quarantine/. A step that cannot be judged or moved
        (a storage error) is left where it is, with a warning."""
        verified = 0
        for step, name, temporary in self._entries():  # newest first
            try:
                problem = None if name == keep else self._problem(step, name, temporary)
                if problem is None:
                    verified += 1
                    if verified > self.keep_last and name != keep:
                        self.fs.rm(f"{self.root}/{name}", recursive=True)
                elif temporary:
                    self.fs.rm(f"{self.root}/{name}", recursive=True)
                else:
                    self._quarantine(name, problem)
            except OSError as e:
                warnings.warn(
                    f"could not prune {self.url}/{name}: {e}", CheckpointWarning, stacklevel=4
                )

    def _quarantine(self, name: str, reason: str, as_name: str | None = None) -> None:
        """Moves checkpoint directory `name` whole into quarantine/, as `as_name` if given (a
        second one of the same name gets a suffix), writes `reason` into it, and warns."""
        target = f"{self.root}/{QUARANTINE}/{as_name or name}"
        self.fs.invalidate_cache()
        if self.fs.exists(target):
            target = f"{target}.{uuid.uuid4().hex[:8]}"
        self.fs.makedirs(f"{self.root}/{QUARANTINE}", exist_ok=True)
        self._rename(f"{self.root}/{name}", target)
        self._write_file(f"{target}/{QUARANTINE_REASON}", f"{reason}\n".encode())
        moved = f"{self.url}/{QUARANTINE}/{target.rsplit('/', 1)[-1]}"
        warnings.warn(f"{reason}; moved it to {moved}", CheckpointWarning, stacklevel=4)

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
        """The commit marker of checkpoint directory `name`, checked against the directory:
        it describes `step` and lists exactly the files there, with their sizes (hashes:
        `_check_hashes`); IncompleteCheckpointError saying why not."""
        where = f"checkpoint {self.url}/{name}"
        directory = f"{self.root}/{name}"
        self.fs.invalidate_cache()
        try:
            marker = json.loads(self.fs.cat_file(f"{directory}/{MARKER}"))
        except FileNotFoundError:
            if not self.fs.exists(directory):
                raise IncompleteCheckpointError(f"{where} does not exist") from None
            raise IncompleteCheckpointError(
                f"{where} is partial: it has no {MARKER} marker (an unfinished save)"
            ) from None
        except ValueError as e:  # not JSON, not UTF-8
            raise IncompleteCheckpointError(
                f"{where} is corrupt: its {MARKER} marker is unreadable ({type(e).__name__}: {e})"
            ) from None
        problem = _marker_problem(marker, step)
        if problem is None:
            sizes = self._sizes(directory)
            sizes.pop(MARKER, None)
            problem = _listing_problem(marker["files"], sizes)
        if problem is not None:
            raise IncompleteCheckpointError(f"{where} is corrupt: {problem}")
        return marker

    def _check_hashes(self, name: str, entries: list[tuple[str, dict]]) -> None:
        """Each file's hash against its entry in the marker; IncompleteCheckpointError naming
        the first file that differs."""
        for path, entry in entries:
            where = f"checkpoint {self.url}/{name} is corrupt: {path}"
            try:
                digest = self._hash_file(f"{self.root}/{name}/{path}")
            except FileNotFoundError:
                raise IncompleteCheckpointError(f"{where} is missing") from None
            if digest != entry[HASH]:
                raise IncompleteCheckpointError(f"{where} does not match its {HASH} in {MARKER}")

    def _verify(self, name: str, marker: dict, group: dist.ProcessGroup | None) -> None:
        """`_check_hashes` of every file, the files shared out over the ranks; raises
        IncompleteCheckpointError on every rank if any file differs."""
        rank, world = _rank_world(group)
        entries = sorted(marker["files"].items())
        mine = [(path, entry) for i, (path, entry) in enumerate(entries) if i % world == rank]
        try:
            _on_every_rank(lambda: self._check_hashes(name, mine), group)
        except RuntimeError as e:  # another rank found the corrupt file
            raise IncompleteCheckpointError(str(e)) from None

    def _check(self, step: int, name: str) -> None:
        """Verifies the committed checkpoint in directory `name` in this process alone:
        marker, listing, sizes and every hash; IncompleteCheckpointError saying why not."""
        self._check_hashes(name, sorted(self._marker(name, step)["files"].items()))

    def _unfinished(self, name: str) -> str:
        return f"checkpoint {self.url}/{name} is partial: an unfinished save"

    def _problem(self, step: int, name: str, temporary: bool) -> str | None:
        """Why a checkpoint directory does not verify (every hash read); None if it does."""
        if temporary:
            return self._unfinished(name)
        try:
            self._check(step, name)
        except IncompleteCheckpointError as e:
            return str(e)
        return None

    def _newest(self, attempt: Callable[[int, str], _T], skipping: str) -> _T | None:
        """attempt(step, directory name) on each committed checkpoint, newest first, until one
        returns; each one before that raised IncompleteCheckpointError or
        UnsafeCheckpointError, and each unfinished save, is skipped with a CheckpointWarning
        (the reason, then `skipping`). None when the run has no committed checkpoint at all;
        NoLoadableCheckpointError, naming each one's reason, when it has and none passes."""
        skipped: list[str] = []
        committed = False
        for step, name, temporary in self._entries():
            if temporary:
                problem = self._unfinished(name)
            else:
                committed = True
                try:
                    return attempt(step, name)
                except (IncompleteCheckpointError, UnsafeCheckpointError) as e:
                    problem = str(e)
            skipped.append(problem)
            warnings.warn(f"{problem}; {skipping}", CheckpointWarning, stacklevel=3)
        if committed:
            raise NoLoadableCheckpointError(
                f"no checkpoint under {self.url} verifies and loads; nothing was deleted (move "
                f"the damaged ones aside, or continue under another tracking.run_name): "
                + "; ".join(skipped)
            )
        return None

    def restore_set_aside(self, group: dist.ProcessGroup | None = None) -> None:
        """Finishes what a save interrupted between its two renames left (see the module
        docstring): a checkpoint set aside whose step has no checkpoint now goes back in
        place if it verifies (else to quarantine/); one whose step has a checkpoint again
        was replaced, and is deleted. For when no save of the run can be under way, such
        as a run's start; rank 0 acts, every rank of `group` waits for it."""

        def restore() -> None:
            self.fs.invalidate_cache()
            try:
                listed = [
                    p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)
                ]
            except FileNotFoundError:  # a fresh run
                return
            names = {n for n in listed if _COMMITTED_NAME.fullmatch(n)}
            for aside in sorted(listed, reverse=True):
                if not (match := _SET_ASIDE_NAME.fullmatch(aside)):
                    continue
                step = int(match.group(1))
                name = _dir_name(step)
                if name in names:
                    self.fs.rm(f"{self.root}/{aside}", recursive=True)
                elif (problem := self._problem(step, aside, temporary=False)) is not None:
                    self._quarantine(aside, problem, as_name=name)
                else:
                    self._rename(f"{self.root}/{aside}", f"{self.root}/{name}")
                    names.add(name)

        _on_every_rank(restore if _rank_world(group)[0] == 0 else lambda: None, group)

    def remove_unfinished(self) -> None:
        """Deletes the run's unfinished saves (`step-*.tmp-*`): for when no save of the run
        can be under way, such as after its workers were stopped."""
        for _, name, temporary in self._entries():
            if temporary:
                self.fs.rm(f"{self.root}/{name}", recursive=True)

    def has_checkpoints(self) -> bool:
        """Whether the run has committed any checkpoint, whether it verifies or not (only
        unfinished saves, or nothing: a fresh run)."""
        return any(not temporary for _, _, temporary in self._entries())

    def steps(self) -> list[int]:
        """Steps of the checkpoints that verify, ascending (reads every one whole)."""
        return sorted(
            step
            for step, name, temporary in self._entries()
            if self._problem(step, name, temporary) is None
        )

    def verify(self, step: int) -> None:
        """Reads the checkpoint of `step` whole in this process; IncompleteCheckpointError
        saying why unless it verifies."""
        _check_step(step)
        self._check(step, _dir_name(step))

    def shared_state(self, step: int) -> dict:
        """The shared state of checkpoint `step`, read on its own, to plan a resume: `step`
        from `latest`, which verified it."""
        return loads_state(self.fs.cat_file(f"{self.root}/{_dir_name(step)}/{SHARED}"))

    def latest(self) -> int | None:
        """The newest checkpoint that verifies (see the module's docstring): its step, or None
        when the run has no checkpoint. Each newer one that does not is skipped with a
        CheckpointWarning (warnings.warn) saying why; NoLoadableCheckpointError when the run
        has checkpoints and none verifies."""

        def verified(step: int, name: str) -> int:
            self._check(step, name)
            return step

        return self._newest(verified, "skipping it")

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
                f"step {step} has no checkpoint under {self.url}; checkpoints that verify: "
                f"{self.steps()}"
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
        a CheckpointWarning naming why; NoLoadableCheckpointError when the run has
        checkpoints and none loads."""
        return self._newest(
            lambda step, _: (step, *self.load(step, tensors, group)), "trying an older one"
        )
