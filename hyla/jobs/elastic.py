"""The global batch of a run that changes size: kept when a run continues at another dp,
and elastic runs sized to the cluster, shrinking when nodes go and growing when they return.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading

import fsspec

from hyla.platform.checkpoint import CheckpointStore
from hyla.platform.config import JobConfig
from hyla.platform.paths import RESIZE_FILE, run_folder, run_storage

log = logging.getLogger(__name__)


def _saved_global_batch(cfg: JobConfig) -> int | None:
    """The global batch the run trained with, from its newest checkpoint that verifies;
    NoLoadableCheckpointError, before anything starts, when it has checkpoints and none
    verifies."""
    store = CheckpointStore(run_storage(cfg), cfg.checkpoint.keep_last)
    step = store.latest()
    saved = None if step is None else store.shared_state(step).get("data")
    return None if saved is None else saved["global_batch"]


def with_global_batch(cfg: JobConfig, dp: int, want: int) -> JobConfig:
    """`cfg` at data-parallel degree `dp`, with trainer.grad_accum (then data.batch_size, to
    the largest that fits) set so that the global batch is `want`; ValueError when `dp`
    does not divide it."""
    if want % dp:
        divisors = [d for d in range(1, want + 1) if want % d == 0]
        raise ValueError(
            f"run {cfg.tracking.run_name!r} trains with a global batch of {want} sequences "
            f"(dp x data.batch_size x trainer.grad_accum), which parallel.dp = {dp} does not "
            f"divide; use parallel.dp in {divisors}, or trainer.allow_batch_change=true"
        )
    per_rank = want // dp
    batch = max(b for b in range(1, min(cfg.data.batch_size, per_rank) + 1) if per_rank % b == 0)
    return dataclasses.replace(
        cfg,
        parallel=dataclasses.replace(cfg.parallel, dp=dp),
        data=dataclasses.replace(cfg.data, batch_size=batch),
        trainer=dataclasses.replace(cfg.trainer, grad_accum=per_rank // batch),
    )


def keep_global_batch(cfg: JobConfig) -> JobConfig:
    """A run that continues (a rerun, `hyla resume`) at another dp keeps its global batch,
    dp x data.batch_size x trainer.grad_accum, so that it reads exactly the samples it would
    have (see `with_global_batch`), and a warning says what changed. ValueError, before
    anything starts, when dp does not divide it (unless trainer.allow_batch_change)."""
    want = _saved_global_batch(cfg)
    if want is None or want == cfg.global_batch or cfg.trainer.allow_batch_change:
        return cfg
    kept = with_global_batch(cfg, cfg.parallel.dp, want)
    _say_split(kept, cfg, f"continues at dp = {kept.parallel.dp} with")
    return kept


def _say_split(new: JobConfig, old: JobConfig, what: str) -> None:
    log.warning(
        "run %s %s its global batch of %d sequences: data.batch_size %d -> %d, "
        "trainer.grad_accum %d -> %d",
        new.tracking.run_name,
        what,
        new.global_batch,
        old.data.batch_size,
        new.data.batch_size,
        old.trainer.grad_accum,
        new.trainer.grad_accum,
    )


# ---------------------------------------------------------------------- elastic runs
def _capacity_dp(cfg: JobConfig) -> int | None:
    """The largest dp an elastic run may take (cfg.elastic_dps) that the alive nodes hold."""
    import ray

    alive = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    workers = sum(r.get("CPU", 0) for r in alive) / max(cfg.cluster.cpus_per_worker, 1e-9)
    if cfg.cluster.use_gpu:
        workers = min(workers, sum(r.get("GPU", 0) for r in alive))
    fits = [dp for dp in cfg.elastic_dps() if dp * cfg.parallel.sp <= workers]
    return max(fits, default=None)


def sized_for_cluster(cfg: JobConfig) -> JobConfig:
    """An elastic run's next attempt: at the largest dp the cluster holds now."""
    dp = _capacity_dp(cfg)
    if dp is None:
        raise RuntimeError(
            f"the Ray cluster holds fewer than cluster.min_workers = {cfg.cluster.min_workers} "
            f"workers of {cfg.cluster.cpus_per_worker} CPUs now"
        )
    want = _saved_global_batch(cfg) or cfg.global_batch
    sized = with_global_batch(cfg, dp, want)
    if sized.parallel.dp != cfg.parallel.dp:
        _say_split(sized, cfg, f"runs at dp = {dp} ({dp * cfg.parallel.sp} workers) with")
    return sized


class GrowthWatch:
    """While an elastic attempt runs: once the cluster holds a larger dp, ask the workers to
    checkpoint and stop (the resize file), so that the next attempt grows."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg, self._stop = cfg, threading.Event()
        self._thread = threading.Thread(target=self._watch, name="hyla-growth", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.cfg.cluster.resize_interval):
            grown = _capacity_dp(self.cfg)
            if grown is not None and grown > self.cfg.parallel.dp:
                with fsspec.open(f"{run_folder(self.cfg)}/{RESIZE_FILE}", "w") as f:
                    json.dump({"dp": grown}, f)
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def take_resize_request(cfg: JobConfig) -> bool:
    """Whether the attempt stopped to grow; the request is removed."""
    fs, path = fsspec.core.url_to_fs(f"{run_folder(cfg)}/{RESIZE_FILE}")
    if not fs.exists(path):
        return False
    fs.rm(path)
    return True
