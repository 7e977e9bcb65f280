"""Running a training job on Ray Train: what `hyla train`, `hyla resume` and `hyla sync` do.

The driver composes and validates the config, names the run, checks what it can before
anything starts (`hyla.platform.preflight`), connects to Ray (RAY_ADDRESS or
cluster.address, else an embedded local instance of its own that it shuts down at the end)
and starts a TorchTrainer with dp x sp workers. Every worker runs
hyla.platform.trainer.Trainer, which resumes from the newest checkpoint of the run that
loads; so a restarted worker group, `hyla resume RUN` and a rerun with the same
tracking.run_name all continue where the run stopped, in the same MLflow run.

Restarts: a worker group that fails because a worker died, a node was lost or another
transient fault hit it is started again, up to cluster.max_failures times. An error that is
a property of the config or the data (a ValueError, from hyla's own checks, in any worker)
would only happen again: it ends the run at once, with that error. SIGTERM and SIGINT stop
the run cleanly (`hyla.jobs.stopping`). Either way the MLflow run is left FINISHED, FAILED or
KILLED, never RUNNING.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import fsspec

from hyla.jobs.elastic import GrowthWatch, keep_global_batch, sized_for_cluster, take_resize_request
from hyla.jobs.embedded import ray_connection
from hyla.jobs.output import ProgressLines, routed_output
from hyla.jobs.stopping import Stopped, in_a_thread, stopped_by_signals, take_signals
from hyla.platform.checkpoint import CheckpointStore, StorageFullError
from hyla.platform.config import JobConfig, from_dict, with_overrides
from hyla.platform.outbox import adopt_legacy_spool, sync
from hyla.platform.paths import (
    CONFIG_FILE,
    DATA_CACHE_DIR,
    SPOOL_DIR,
    SUMMARY_FILE,
    TRACKING_FILE,
    console_log_file,
    local_run_dir,
    run_folder,
    run_storage,
)
from hyla.platform.preflight import preflight
from hyla.platform.run_outputs import run_config, run_folder_of
from hyla.platform.tracking import settle_run

log = logging.getLogger(__name__)


def prepared(cfg: JobConfig) -> JobConfig:
    """The config as workers need it: tracking.run_name set (a new timestamped name when it
    is null) and local paths made absolute (Ray workers run in folders of their own)."""
    name = cfg.tracking.run_name or time.strftime("hyla-%Y%m%d-%H%M%S")
    uri = cfg.tracking.uri
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{os.path.abspath(uri.removeprefix('sqlite:///'))}"
    data = cfg.data
    if data.source not in ("stdlib", "mqar"):
        data = dataclasses.replace(data, source=_absolute(data.source))
    if data.tokenizer != "bytes":
        data = dataclasses.replace(data, tokenizer=_absolute(data.tokenizer))
    return dataclasses.replace(
        cfg,
        data=data,
        checkpoint=dataclasses.replace(cfg.checkpoint, dir=_absolute(cfg.checkpoint.dir)),
        tracking=dataclasses.replace(cfg.tracking, run_name=name, uri=uri),
    )


def _absolute(url: str) -> str:
    return url if "://" in url else os.path.abspath(url)


def resume_config(run: str, overrides: list[str], storage: str | None) -> JobConfig:
    """The config a run was started with (saved in its folder), with `overrides` applied."""
    return with_overrides(run_config(run_folder_of(run, storage, "the run to resume")), overrides)


def sync_run(run: str, storage: str | None) -> int:
    """`hyla sync RUN`: send the run's tracking spools (see hyla.platform.outbox)."""
    folder = run_folder_of(run, storage, "the run to sync")
    fs, path = fsspec.core.url_to_fs(folder)
    if not fs.exists(path):
        raise ValueError(f"there is no run {run!r}: {folder} does not exist (see --storage)")
    spools = f"{folder}/{SPOOL_DIR}"
    try:
        sent = sync(spools)
    except ValueError:
        raise
    except Exception as e:
        raise ConnectionError(
            f"the tracking spools in {spools} could not be sent ({type(e).__name__}: {e}); "
            f"is the run's MLflow store up?"
        ) from None
    print(f"run {run}: {sent} tracking operations sent" if sent else f"run {run}: nothing to send")
    return 0


def _run_exists(cfg: JobConfig) -> bool:
    """Whether the run has started at least once (its config is saved in its folder); false
    also when its storage cannot be reached (the job's own error says why)."""
    try:
        fs, path = fsspec.core.url_to_fs(f"{run_folder(cfg)}/{CONFIG_FILE}")
        return bool(fs.exists(path))
    except (ValueError, OSError, ImportError):
        return False


def _remember_config(cfg: JobConfig) -> None:
    """Save the run's config in its folder; a rerun under the same name must train the same
    model once the run has checkpoints (they would not fit another)."""
    url = f"{run_folder(cfg)}/{CONFIG_FILE}"
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        with fs.open(path, "r") as f:
            saved = from_dict(json.load(f))
        store = CheckpointStore(run_storage(cfg), cfg.checkpoint.keep_last)
        has_checkpoints = store.has_checkpoints()  # verified or not: they belong to the model
        if saved.model != cfg.model and has_checkpoints:
            raise ValueError(
                f"run {cfg.tracking.run_name!r} already exists with another model config; "
                f"choose a new tracking.run_name, or `hyla resume {cfg.tracking.run_name}`"
            )
    fs.makedirs(fs._parent(path), exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)


def _check_storage(cfg: JobConfig, nodes: int) -> None:
    root = cfg.checkpoint.dir
    if root.startswith("memory://"):
        raise ValueError(
            f"checkpoint.dir {root!r} lives in one process's memory, and Ray workers are other "
            f"processes; use a local path or shared storage such as s3://bucket/prefix"
        )
    is_local = "://" not in root or root.startswith("file://")
    if is_local and nodes > 1:
        raise ValueError(
            f"checkpoint.dir {root!r} is a local path, but the Ray cluster has {nodes} nodes: "
            f"workers on other nodes could not see its checkpoints. Use shared storage, e.g. "
            f"checkpoint.dir=s3://bucket/prefix"
        )


def train_job(cfg: JobConfig) -> dict[str, Any]:
    """Run the job on Ray Train; returns rank 0's summary (see Trainer.fit), with the run's
    console log (everything the job printed; the console shows what matters: see
    hyla.jobs.output)."""
    cfg = prepared(cfg)
    _check_storage(cfg, nodes=1)
    log_file = console_log_file(cfg)
    try:
        with stopped_by_signals(), routed_output(log_file, keep=lambda: _run_exists(cfg)):
            preflight(cfg, str(local_run_dir(cfg)))
            adopt_legacy_spool(f"{run_folder(cfg)}/{SPOOL_DIR}")  # before Ray, as its checks
            summary = _train_on_ray(keep_global_batch(cfg))
    except Stopped as e:
        raise Stopped(e.signum, _stopped_message(cfg, e)) from None
    return {**summary, "console_log": str(log_file)}


def _stopped_message(cfg: JobConfig, stop: Stopped) -> str:
    """One line: what stopped the run, where it stands and how to continue it."""
    name = cfg.tracking.run_name
    if not _run_exists(cfg):
        return f"stopped by {stop.name} before run {name} started; nothing is under its name"
    try:
        with warnings.catch_warnings():  # the job's log named any damaged checkpoint
            warnings.simplefilter("ignore")
            step = CheckpointStore(run_storage(cfg), cfg.checkpoint.keep_last).latest()
    except (ValueError, OSError):
        step = None
    where = f"its last checkpoint, step {step}" if step is not None else "step 0 (no checkpoint)"
    return (
        f"stopped by {stop.name}: run {name} is marked KILLED and continues from {where}, "
        f"with `hyla resume {name} --storage {cfg.checkpoint.dir}`"
    )


def _train_on_ray(cfg: JobConfig) -> dict[str, Any]:
    import ray

    status = "FAILED"
    try:
        with ray_connection(cfg) as embedded:
            take_signals()  # ray.init took them
            _check_storage(cfg, nodes=sum(1 for n in ray.nodes() if n["Alive"]))
            check_resources(cfg)
            _remember_config(cfg)
            _fit_with_restarts(with_token_store(cfg), embedded)
            status = "FINISHED"
    except KeyboardInterrupt:  # Stopped too
        status = "KILLED"
        raise
    finally:
        # Ray is down, and its workers with it: they could not end their MLflow run (a run
        # that never started has no record, and this does nothing), nor their saves
        if status != "FINISHED":
            # A stopped run's workers may have ended it FAILED as Ray went down under them:
            # the stop is what ended it.
            replacing = ("RUNNING", "FAILED") if status == "KILLED" else ("RUNNING",)
            settle_run(f"{run_folder(cfg)}/{TRACKING_FILE}", status, replacing)
        if status == "KILLED":
            _remove_unfinished_saves(cfg)
    with fsspec.open(f"{run_folder(cfg)}/{SUMMARY_FILE}", "r") as f:
        summary = json.load(f)
    if cfg.tracking.log_model or cfg.tracking.register_model:
        summary["model_version"] = _log_final_model(cfg)
    return summary


def _remove_unfinished_saves(cfg: JobConfig) -> None:
    """A stopped run's interrupted saves (its workers are gone); cleanup only: what cannot
    be removed now, the run's next save removes."""
    try:
        CheckpointStore(run_storage(cfg), cfg.checkpoint.keep_last).remove_unfinished()
    except (OSError, ValueError) as e:
        log.warning("run %s: unfinished saves were not removed: %s", cfg.tracking.run_name, e)


def with_token_store(cfg: JobConfig) -> JobConfig:
    """The config with a raw data.source replaced by its token store, prepared once with Ray
    Data and cached under checkpoint.dir (keyed by the source's files, the tokenizer and
    data.val_fraction): every worker, restart and resume reads it instead of tokenising the
    source itself."""
    from hyla.platform.data import is_store, prepare_cached

    data = cfg.data
    if data.sources or data.source == "mqar" or is_store(data.source):
        return cfg
    cache = f"{cfg.checkpoint.dir.rstrip('/')}/{DATA_CACHE_DIR}"
    progress = ProgressLines(f"token store of data.source {data.source}")
    url = prepare_cached(data, cache, data.prepare_workers, progress)
    log.info("run %s: token store of data.source %s: %s", cfg.tracking.run_name, data.source, url)
    return dataclasses.replace(cfg, data=dataclasses.replace(data, source=url))


def _log_final_model(cfg: JobConfig) -> str | None:
    """Export the run's newest checkpoint and log it to its MLflow run (registering it when
    tracking.register_model names a model). The checkpoints are what matters: a store that
    fails here is a warning, and `hyla export RUN --register NAME` does it later."""
    import tempfile

    from hyla.platform.registry import log_model
    from hyla.platform.run_outputs import export, find_checkpoint

    try:
        assert cfg.tracking.run_name is not None  # hyla train names every run
        checkpoint = find_checkpoint(cfg.tracking.run_name, cfg.checkpoint.dir)
        record = checkpoint.tracking() or {}
        if not record.get("run_id"):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            folder = export(checkpoint, f"{tmp}/model")
            return log_model(
                folder,
                record["tracking_uri"],
                record["run_id"],
                checkpoint.step,
                checkpoint.url,
                register_as=cfg.tracking.register_model,
            )
    except Exception as e:
        log.warning(
            "run %s: the final model was not logged to MLflow: %s", cfg.tracking.run_name, e
        )
        return None


def _fit_with_restarts(cfg: JobConfig, embedded: bool) -> None:
    """trainer.fit(), started again after transient failures (each start resumes from the
    newest checkpoint); an input error in any worker ends it at once. An elastic run starts
    each attempt at the largest dp the cluster holds, and one that stopped to grow again."""
    from ray.train import TrainingFailedError

    failures = 0
    while True:
        attempt = sized_for_cluster(cfg) if cfg.cluster.elastic else cfg
        watch = GrowthWatch(attempt) if cfg.cluster.elastic else None
        try:
            # not in the main thread, where Ray Train would take SIGINT (see hyla.jobs.stopping)
            in_a_thread(torch_trainer(attempt, embedded).fit, "hyla-fit")
        except TrainingFailedError as e:
            final = _final_error(e)
            if final is not None:
                raise final from None
            failures += 1
            if failures > cfg.cluster.max_failures:
                raise RuntimeError(
                    f"training failed {failures} times, more than cluster.max_failures = "
                    f"{cfg.cluster.max_failures} restarts allow; the last failure: {e}"
                ) from e
            log.warning(
                "the worker group failed (%s); restart %d of %d, from the newest checkpoint",
                _first_line(e),
                failures,
                cfg.cluster.max_failures,
            )
            continue
        finally:
            if watch is not None:
                watch.stop()
        if not take_resize_request(attempt):
            return
        log.warning("run %s: the cluster has room for more workers; growing", cfg.tracking.run_name)


def _final_error(error: Exception) -> Exception | None:
    """A worker's error that another attempt would only repeat: a ValueError (hyla's input
    errors) or a full checkpoint storage; the error to end the job with."""
    for rank, failure in sorted(getattr(error, "worker_failures", {}).items()):
        for kind in (ValueError, StorageFullError):
            if isinstance(failure, kind):
                return kind(f"{failure} (raised by worker {rank})")
    return None


def _first_line(error: Exception) -> str:
    return next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)


def torch_trainer(
    cfg: JobConfig,
    embedded: bool,
    worker: Callable[[dict[str, Any]], None] | None = None,
    extra: dict[str, Any] | None = None,
    name: str | None = None,
):
    """A TorchTrainer of dp x sp workers running `worker` (default: training) with the
    loop config {"job": cfg as a dict, **extra}; `name` names Ray's own run state."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from hyla.jobs.loopback import LoopbackTorchConfig

    backend = "nccl" if cfg.cluster.use_gpu else "gloo"
    return TorchTrainer(
        worker or _worker,
        train_loop_config={"job": cfg.to_dict(), **(extra or {})},
        torch_config=(LoopbackTorchConfig if embedded else TorchConfig)(backend=backend),
        scaling_config=ScalingConfig(
            num_workers=cfg.parallel.world_size,
            use_gpu=cfg.cluster.use_gpu,
            resources_per_worker={"CPU": cfg.cluster.cpus_per_worker},
        ),
        run_config=RunConfig(
            # Ray keeps only its own run state here: hyla's checkpoints are on checkpoint.dir,
            # which every worker reads and writes itself. Restarts are hyla's (see above).
            name=name or cfg.tracking.run_name,
            storage_path=str(local_run_dir(cfg) / "ray"),
            # ray.train exports Train v2's FailureConfig; mypy resolves the v1 one (ray.air)
            failure_config=FailureConfig(max_failures=0, controller_failure_limit=0),  # type: ignore[call-arg]
        ),
    )


def check_resources(cfg: JobConfig) -> None:
    """A cluster must hold the CPUs (and GPUs) of dp x sp workers, or Ray would wait for them
    forever."""
    import ray

    total = ray.cluster_resources()
    world = cfg.cluster.worker_bounds()[0] if cfg.cluster.elastic else cfg.parallel.world_size
    need = {"CPU": world * cfg.cluster.cpus_per_worker}
    if cfg.cluster.use_gpu:
        need["GPU"] = world
    short = {k: v for k, v in need.items() if total.get(k, 0) < v}
    if short:
        have = {k: total.get(k, 0) for k in short}
        raise ValueError(
            f"the Ray cluster has {have} but {world} workers (parallel.dp x parallel.sp, or "
            f"cluster.min_workers for an elastic run) with "
            f"cluster.cpus_per_worker = {cfg.cluster.cpus_per_worker}"
            f"{' and a GPU each' if cfg.cluster.use_gpu else ''} need {need}; add nodes or "
            f"lower the parallel degrees"
        )


def _worker(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs."""
    import ray.train
    import ray.train.torch

    from hyla.platform.trainer import Trainer

    cfg = from_dict(config["job"])
    device = ray.train.torch.get_device() if cfg.cluster.use_gpu else None
    result = Trainer(cfg, device).fit()
    if ray.train.get_context().get_world_rank() == 0:
        summary = dataclasses.asdict(result)
        summary["losses"] = {str(k): v for k, v in summary["losses"].items()}
        with fsspec.open(f"{run_folder(cfg)}/{SUMMARY_FILE}", "w") as f:
            json.dump(summary, f, indent=1)
