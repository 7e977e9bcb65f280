"""Tracking that outlives its store: MLflow calls made from a background thread, in order.

Training only queues what it tracks (metric points, checkpoint records, the run's end) and
never waits for the store. A thread sends the queue in order; when the store stops answering
it warns once, moves everything not yet sent to the run's spool file, and tries again every
`retry_interval` seconds; when the store answers again it warns once more and sends the
spool, then the queue. Replays are free of duplicates: before the first send after an outage
it reads, for each metric key, the step of the run's latest point, and drops points at or
below it (a request that timed out may still have been stored). A spool still there when the
session ends (the store never came back) is sent by `hyla sync RUN`, or by the next session
of the same MLflow run.

The spool of MLflow run R is <spool dir>/R.jsonl: a header line {"run_id", "tracking_uri"},
then one operation per line, only ever appended to (one append per batch of operations the
thread moves there, never a rewrite), and read line by line: memory holds what was queued
since the last move, never the spool. A line cut short by a crash is skipped with a warning.
The end status of an earlier session is never sent by a later one, which ends the run
itself. A session, or `hyla sync`, owns the spools of its folder through `SpoolLock`.

Earlier releases kept one spool per run folder, <spool dir>.json, a JSON document rewritten
whole on every write. A session of the run, `hyla train`'s driver and `hyla sync` convert
one they find into its MLflow run's spool, once (`adopt_legacy_spool`); one that does not
parse is refused, naming it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.utils.validation import MAX_METRICS_PER_BATCH

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"  # one <step>.json artifact per saved checkpoint
LAST_CHECKPOINT_TAG = "hyla.last_checkpoint"
SPOOL_SUFFIX = ".jsonl"
LEGACY_SUFFIX = ".json"  # the earlier format's file, beside the spool folder
LOCK_FILE = "lock"

# An operation, as JSON: {"kind": "metrics", "step", "time_ms", "values": {key: value}},
# {"kind": "checkpoint", "step", "url"}, {"kind": "tag", "key", "value"} or
# {"kind": "terminate", "status"}.
Op = dict[str, Any]


def latest_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """The step of each metric key's latest point in the run."""
    return {m.key: m.step for m in client.get_run(run_id).data.to_proto().metrics}


def send(client: MlflowClient, run_id: str, op: Op, sent: dict[str, int]) -> None:
    """One operation; metric points at or below `sent[key]` are dropped, and `sent` is
    updated with what went out."""
    if op["kind"] == "metrics":
        step = op["step"]
        points = [
            Metric(key, float(value), op["time_ms"], step)
            for key, value in op["values"].items()
            if step > sent.get(key, -1)
        ]
        for start in range(0, len(points), MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=points[start : start + MAX_METRICS_PER_BATCH])
        sent.update((m.key, step) for m in points)
    elif op["kind"] == "checkpoint":
        record = {"step": op["step"], "url": op["url"]}
        client.log_dict(run_id, record, f"{CHECKPOINTS_DIR}/{op['step']:09d}.json")
        client.set_tag(run_id, LAST_CHECKPOINT_TAG, op["url"])
    elif op["kind"] == "tag":
        client.set_tag(run_id, op["key"], op["value"])
    elif op["kind"] == "terminate":
        client.set_terminated(run_id, op["status"])
    else:
        raise ValueError(f"unknown tracking operation {op!r}")


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


class SpoolLock:
    """Who owns the spools of one folder: a session of a run, for as long as it runs, or
    `hyla sync` while it sends them.

    On local files it is an flock(2) on <spool dir>/lock, which the kernel drops when its
    process dies: a session waits for a running `hyla sync`, and `hyla sync` refuses a folder
    a session holds. Other fsspec storage (S3 and the like) has no locks: there it is the file
    <spool dir>/lock, created exclusively (a conditional put on S3) and removed on release.
    Such a file outlives a process that dies, and only one session of a run runs at a time,
    so a session takes over a lock file it finds, with a warning; `hyla sync` refuses it,
    naming the file to delete once no session of the run is running.
    """

    def __init__(self, spool_dir: str) -> None:
        self.url = f"{spool_dir.rstrip('/')}/{LOCK_FILE}"
        self._fs, self._path = fsspec.core.url_to_fs(self.url)
        self._file: IO[bytes] | None = None  # the open lock file (local storage)
        self.held = False

    def acquire(self, session: bool) -> bool:
        """Take the lock: a session waits for it (or takes over a lock file, see above);
        `hyla sync` (session=False) gets False where someone holds it."""
        self._fs.makedirs(self._fs._parent(self._path), exist_ok=True)
        self.held = self._flock(session) if _is_local(self.url) else self._create(session)
        return self.held

    def release(self) -> None:
        if not self.held:
            return
        if self._file is not None:
            self._file.close()  # closing the descriptor drops its flock
            self._file = None
        else:
            with contextlib.suppress(FileNotFoundError):
                self._fs.rm(self._path)
        self.held = False

    def _flock(self, wait: bool) -> bool:
        file = open(self._path, "ab")  # noqa: SIM115 - held open while the lock is
        try:
            fcntl.flock(file, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            return False
        self._file = file
        return True

    def _create(self, take_over: bool) -> bool:
        holder = json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode()
        try:
            with self._fs.open(self._path, "xb") as f:
                f.write(holder)
            return True
        except FileExistsError:
            if not take_over:
                return False
        log.warning("taking over the tracking spool lock %s, left by an earlier session", self.url)
        with self._fs.open(self._path, "wb") as f:
            f.write(holder)
        return True


class Spool:
    """The spool file of one MLflow run (see above)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._fs, self._path = fsspec.core.url_to_fs(url)
        self._ends_whole = False  # known to end with a whole line: appends go straight on

    def exists(self) -> bool:
        return bool(self._fs.exists(self._path))

    def size(self) -> int:
        return int(self._fs.size(self._path)) if self.exists() else 0

    def header(self) -> dict[str, Any] | None:
        """{"run_id", "tracking_uri"}; None when there is no file or its header line is torn
        (the header is written alone, so such a file holds nothing else)."""
        try:
            with self._fs.open(self._path, "rb") as f:
                line = f.readline()
        except FileNotFoundError:
            return None
        return _parsed(line, "run_id")

    def append(self, ops: list[Op], header: dict[str, Any]) -> None:
        """Write `ops` at the end of the file, one line each."""
        if not self._ends_whole:
            self._prepare(header)
        with self._fs.open(self._path, "ab") as f:
            f.write("".join(json.dumps(op) + "\n" for op in ops).encode())

    def records(self, start: int) -> Iterator[tuple[int, Op]]:
        """(the offset after it, the operation) of each record from byte `start` on (0: the
        first after the header); torn lines are skipped with a warning."""
        with self._fs.open(self._path, "rb") as f:
            f.seek(start)
            offset = start
            if start == 0:
                offset += len(f.readline())
            for line in f:
                offset += len(line)
                op = _parsed(line, "kind")
                if op is not None:
                    yield offset, op
                elif line.strip():
                    log.warning(
                        "the tracking spool %s has a torn record ending at byte %d (a write "
                        "cut short): skipped",
                        self.url,
                        offset,
                    )

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._fs.rm(self._path)
        self._ends_whole = False

    def _prepare(self, header: dict[str, Any]) -> None:
        """Before the first append: a header where there is none, a line end after a torn
        last line (so that it stays a line of its own)."""
        if self.header() is None:
            self._fs.makedirs(self._fs._parent(self._path), exist_ok=True)
            with self._fs.open(self._path, "wb") as f:
                f.write((json.dumps(header) + "\n").encode())
        elif self._fs.tail(self._path, 1) != b"\n":
            with self._fs.open(self._path, "ab") as f:
                f.write(b"\n")
        self._ends_whole = True


def _parsed(line: bytes, key: str) -> dict[str, Any] | None:
    """The JSON object of a whole line that has `key`, else None (a torn line)."""
    if not line.endswith(b"\n"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) and key in value else None


def spool_url(spool_dir: str, run_id: str) -> str:
    return f"{spool_dir.rstrip('/')}/{run_id}{SPOOL_SUFFIX}"


def replay(spool: Spool) -> int:
    """Send every record of `spool` to its run, then delete it; returns how many were sent.
    Raises if the store does not answer."""
    header = spool.header()
    if header is None:
        log.warning("the tracking spool %s holds only a torn header: removed", spool.url)
        spool.remove()
        return 0
    client = MlflowClient(header["tracking_uri"])
    sent = latest_steps(client, header["run_id"])
    count = 0
    for _, op in spool.records(0):
        send(client, header["run_id"], op, sent)
        count += 1
    spool.remove()
    return count


def legacy_spool_url(spool_dir: str) -> str:
    """Where hyla kept a run's spool before this format: <spool dir>.json, one JSON document
    {"run_id", "tracking_uri", "ops": [...]}, rewritten whole on every write."""
    return f"{spool_dir.rstrip('/')}{LEGACY_SUFFIX}"


def adopt_legacy_spool(spool_dir: str, take_lock: bool = True) -> int:
    """Convert a spool of the earlier format (legacy_spool_url) into its MLflow run's spool
    in `spool_dir`, its records before any already there, then delete it; the number of
    records converted (0 without one). `take_lock`: hold the spools' lock meanwhile (False:
    the caller holds it). A legacy spool that does not parse (a rewrite cut short) cannot be
    split into the records it held: ValueError naming it, and it stays as it is."""
    url = legacy_spool_url(spool_dir)
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return 0
    lock = SpoolLock(spool_dir)
    if take_lock:
        lock.acquire(session=True)
    try:
        header, ops = _legacy_records(url, fs.cat_file(path))
        spool = Spool(spool_url(spool_dir, header["run_id"]))
        later = spool.exists()
        if later and (spool.header() or {}).get("run_id") != header["run_id"]:
            raise ValueError(f"{spool.url} is not the spool of MLflow run {header['run_id']}")
        temp = f"{spool._path}.tmp-{uuid.uuid4().hex[:12]}"
        fs.makedirs(fs._parent(temp), exist_ok=True)
        with fs.open(temp, "wb") as out:
            out.write("".join(json.dumps(r) + "\n" for r in [header, *ops]).encode())
            if later:  # what later sessions spooled, after its header
                with spool._fs.open(spool._path, "rb") as f:
                    f.readline()
                    shutil.copyfileobj(f, out)
        fs.mv(temp, spool._path)
        fs.rm(path)
    finally:
        lock.release()
    log.warning(
        "the tracking spool %s of an earlier hyla version is now %s (%d records)",
        url,
        spool.url,
        len(ops),
    )
    return len(ops)


def _legacy_records(url: str, data: bytes) -> tuple[dict[str, str], list[Op]]:
    """The header and the operations of a legacy spool's bytes; ValueError naming it."""
    try:
        legacy = json.loads(data)
        header = {"run_id": legacy["run_id"], "tracking_uri": legacy["tracking_uri"]}
        ops = legacy["ops"]
        valid = all(isinstance(v, str) and v for v in header.values()) and isinstance(ops, list)
        if not valid or not all(isinstance(op, dict) and "kind" in op for op in ops):
            raise ValueError("not {run_id, tracking_uri, ops: [operations]}")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"the tracking spool {url}, of an earlier hyla version, does not parse "
            f"({type(e).__name__}: {e}): a write of it was cut short, and what it held cannot "
            f"be told apart from what was cut; move it out of the run folder (or delete it) "
            f"to go on without those points"
        ) from None
    return header, ops


def sync(spool_dir: str) -> int:
    """`hyla sync`: send the spools in `spool_dir` (0 without any), a legacy one converted
    first; ValueError when a session of the run holds them."""
    fs, path = fsspec.core.url_to_fs(spool_dir)
    legacy_fs, legacy = fsspec.core.url_to_fs(legacy_spool_url(spool_dir))
    if not fs.exists(path) and not legacy_fs.exists(legacy):
        return 0
    lock = SpoolLock(spool_dir)
    if not lock.acquire(session=False):
        raise ValueError(
            f"the tracking spools in {spool_dir} are in use by a running session of the run "
            f"(lock {lock.url}), which sends them itself; if none runs, delete the lock file"
        )
    try:
        adopt_legacy_spool(spool_dir, take_lock=False)
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(f"{path}/*{SPOOL_SUFFIX}"))
        return sum(replay(Spool(f"{spool_dir.rstrip('/')}/{name}")) for name in names)
    finally:
        lock.release()


class Outbox:
    """The queue of one run's operations and the thread that sends them (see above).

    Operations wait in memory until sent, or, while the store is lost, until the thread moves
    them to the spool; the spool's records before `_cursor` are sent, and `_backlog` says
    whether any after it are not. End statuses before `_ends_from` belong to earlier
    sessions of the run: never sent."""

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        uri: str,
        spool_dir: str,
        retry_interval: float,
        sent: dict[str, int],
    ) -> None:
        self._client, self._run_id, self._uri = client, run_id, uri
        self._retry_interval = retry_interval
        self._sent = dict(sent)
        self._ops: deque[Op] = deque()
        self._cv = threading.Condition()
        self._closing = self._abandon = False
        self._online, self._next_try = True, 0.0
        self._spool, self._lock = Spool(spool_url(spool_dir, run_id)), SpoolLock(spool_dir)
        self._cursor = self._ends_from = 0
        self._backlog = self._spool_failed = False
        if self._spool.exists():  # an earlier session that ended offline
            self._lock.acquire(session=True)
            self._ends_from = self._spool.size()  # 0 if `hyla sync` sent it meanwhile
            self._backlog = self._ends_from > 0
            self._online = not self._backlog  # refresh `sent` before replaying
        self._thread = threading.Thread(target=self._run, name="hyla-tracking", daemon=True)
        self._thread.start()

    @property
    def spool_url(self) -> str:
        return self._spool.url

    def put(self, op: Op) -> None:
        with self._cv:
            self._ops.append(op)
            self._cv.notify()

    def close(self, timeout: float) -> bool:
        """Send what is queued, trying the store for up to `timeout` seconds if it is lost;
        True when everything went out, False when the rest stays in the spool file."""
        with self._cv:
            self._closing, self._next_try = True, 0.0
            self._cv.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cv:
                self._abandon = True
                self._cv.notify()
            self._thread.join()
        return not (self._ops or self._backlog)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._ops or self._backlog or self._closing):
                    self._cv.wait()
                if self._abandon or not (self._ops or self._backlog):
                    break
                wait = self._next_try - time.monotonic()
                if not self._online and wait > 0:
                    self._spool_queue()
                    self._cv.wait(wait)  # a new operation or close() wakes it early
                    continue
                backlog = self._backlog
                op = None if backlog else self._ops[0]
            try:
                if not self._online:
                    self._sent.update(latest_steps(self._client, self._run_id))
                if op is None:
                    self._send_backlog()
                else:
                    send(self._client, self._run_id, op, self._sent)
            except Exception as e:
                self._lost(e)
                continue
            if op is not None:
                with self._cv:
                    self._ops.popleft()
            if not self._online:
                self._online = True
                log.warning("the MLflow tracking store %s answers again; replaying", self._uri)
        with self._cv:
            self._spool_queue()
        self._lock.release()

    def _send_backlog(self) -> None:
        """Send the spool from `_cursor` to its end, then delete it. Only this thread writes
        the spool, so it cannot grow meanwhile."""
        for end, op in self._spool.records(self._cursor):
            if not (op["kind"] == "terminate" and end <= self._ends_from):
                send(self._client, self._run_id, op, self._sent)
            self._cursor = end
        with self._cv:
            self._spool.remove()
            self._cursor = self._ends_from = 0
            self._backlog = False

    def _spool_queue(self) -> None:
        """Move the queued operations to the end of the spool (called holding `_cv`); where
        that fails they stay in memory."""
        if not self._ops:
            return
        try:
            if not self._lock.held:
                self._lock.acquire(session=True)
            self._spool.append(list(self._ops), {"run_id": self._run_id, "tracking_uri": self._uri})
        except Exception as e:
            if not self._spool_failed:
                log.warning("could not write the tracking spool %s: %s", self._spool.url, e)
            self._spool_failed = True
            return
        self._ops.clear()
        self._backlog = True

    def _lost(self, error: Exception) -> None:
        if self._online:
            log.warning(
                "the MLflow tracking store %s is unreachable (%s: %s); training goes on, and "
                "what it tracks waits in %s until the store is reachable",
                self._uri,
                type(error).__name__,
                error,
                self._spool.url,
            )
        self._online = False
        self._next_try = time.monotonic() + self._retry_interval
