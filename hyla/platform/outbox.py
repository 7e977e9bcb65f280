"""Tracking that outlives its store: MLflow calls made from a background thread, in order.

Training only queues what it tracks (metric points, checkpoint records, the run's end) and
never waits for the store. A thread sends the queue in order; when the store stops answering
it warns once, writes everything not yet sent to a spool file in the run's folder, and tries
again every `retry_interval` seconds; when the store answers again it warns once more and
replays the queue. Replays are free of duplicates: before the first send after an outage it
reads, for each metric key, the step of the run's latest point, and drops points at or
below it (a request that timed out may still have been stored). A spool still there when the
run ends (the store never came back) is sent by `hyla sync RUN`, or by the next start of the
same run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import deque
from typing import Any

import fsspec
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.utils.validation import MAX_METRICS_PER_BATCH

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"  # one <step>.json artifact per saved checkpoint
LAST_CHECKPOINT_TAG = "hyla.last_checkpoint"

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


def read_spool(url: str) -> dict[str, Any] | None:
    """{"run_id", "tracking_uri", "ops"} of a spool file, or None when there is none."""
    try:
        with fsspec.open(url, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def replay(url: str) -> int:
    """Send every operation of the spool file at `url` to its run, then delete the file;
    returns how many were sent (0 without a spool). Raises if the store does not answer."""
    spool = read_spool(url)
    if spool is None:
        return 0
    client = MlflowClient(spool["tracking_uri"])
    sent = latest_steps(client, spool["run_id"])
    for op in spool["ops"]:
        send(client, spool["run_id"], op, sent)
    fs, path = fsspec.core.url_to_fs(url)
    fs.rm(path)
    return len(spool["ops"])


class Outbox:
    """The queue of one run's operations and the thread that sends them (see above)."""

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        uri: str,
        spool_url: str,
        retry_interval: float,
        sent: dict[str, int],
    ) -> None:
        self._client, self._run_id, self._uri = client, run_id, uri
        self._spool_url, self._retry_interval = spool_url, retry_interval
        self._sent = dict(sent)
        self._ops: deque[Op] = deque()
        self._cv = threading.Condition()
        self._closing = self._abandon = False
        self._online, self._next_try, self._spooled = True, 0.0, False
        previous = read_spool(spool_url)  # an earlier session that ended offline
        if previous is not None and previous.get("run_id") == run_id:
            self._ops.extend(previous["ops"])
            self._online, self._spooled = False, True  # refresh `sent` before replaying
        self._thread = threading.Thread(target=self._run, name="hyla-tracking", daemon=True)
        self._thread.start()

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
        return not self._ops

    @property
    def pending(self) -> int:
        return len(self._ops)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._ops or self._closing):
                    self._cv.wait()
                if not self._ops or self._abandon:
                    break
                wait = self._next_try - time.monotonic()
                if not self._online and wait > 0:
                    self._write_spool()
                    self._cv.wait(wait)  # a new operation or close() wakes it early
                    continue
                op = self._ops[0]
            try:
                if not self._online:
                    self._sent.update(latest_steps(self._client, self._run_id))
                send(self._client, self._run_id, op, self._sent)
            except Exception as e:
                self._lost(e)
                continue
            with self._cv:
                self._ops.popleft()
            if not self._online:
                self._online = True
                log.warning("the MLflow tracking store %s answers again; replaying", self._uri)
            if not self._ops and self._spooled:
                self._remove_spool()
        with self._cv:
            if self._ops:
                self._write_spool()

    def _lost(self, error: Exception) -> None:
        if self._online:
            log.warning(
                "the MLflow tracking store %s is unreachable (%s: %s); training goes on, and "
                "what it tracks waits in %s until the store is reachable",
                self._uri,
                type(error).__name__,
                error,
                self._spool_url,
            )
        self._online = False
        self._next_try = time.monotonic() + self._retry_interval

    def _write_spool(self) -> None:
        spool = {"run_id": self._run_id, "tracking_uri": self._uri, "ops": list(self._ops)}
        try:
            with fsspec.open(self._spool_url, "w") as f:
                json.dump(spool, f)
            self._spooled = True
        except Exception as e:  # nowhere to spool: the points stay in memory
            log.warning("could not write the tracking spool %s: %s", self._spool_url, e)

    def _remove_spool(self) -> None:
        fs, path = fsspec.core.url_to_fs(self._spool_url)
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)
        self._spooled = False
