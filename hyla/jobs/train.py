"""`hyla train` and `hyla resume`: run the job on Ray Train.

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
would only happen again: it ends the run at once, with that error. Either way the MLflow run
is left FINISHED, FAILED or KILLED, never RUNNING.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec

from hyla.platform.checkpoint import CheckpointStore
from hyla.platform.config import JobConfig, check_run_name, compose, from_dict
from hyla.platform.outbox import replay
from hyla.platform.preflight import preflight
from hyla.platform.tracking import SPOOL_FILE, settle_run
from hyla.platform.trainer import (
    RESIZE_FILE,
    TRACKING_FILE,
    local_run_dir,
    run_folder,
    run_storage,
)

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"


def add_commands(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train on Ray (embedded local Ray unless RAY_ADDRESS / cluster.address is set)",
        description="Overrides are hydra-style, e.g. model=gdn-1.3b parallel=sp4 trainer.steps=100",
    )
    train.add_argument("overrides", nargs="*", help="config overrides, key=value")
    train.set_defaults(func=lambda args: _print_summary(train_job(compose(args.overrides))))
    resume = commands.add_parser(
        "resume", help="continue a run from its newest complete checkpoint"
    )
    resume.add_argument("run", help="the run's name (tracking.run_name)")
    resume.add_argument(
        "overrides", nargs="*", help="changes to the run's saved config, e.g. trainer.steps=200"
    )
    resume.add_argument(
        "--storage", default=None, help="checkpoint.dir of the run (default: configs' default)"
    )
    resume.set_defaults(
        func=lambda args: _print_summary(
            train_job(resume_config(args.run, args.overrides, args.storage))
        )
    )
    sync = commands.add_parser(
        "sync", help="send what a run tracked while its MLflow store was unreachable"
    )
    sync.add_argument("run", help="the run's name (tracking.run_name)")
    sync.add_argument(
        "--storage", default=None, help="checkpoint.dir of the run (default: configs' default)"
    )
    sync.set_defaults(func=lambda args: sync_run(args.run, args.storage))


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
    from omegaconf import OmegaConf

    check_run_name(run, "the run to resume")
    root = storage or compose([]).checkpoint.dir
    url = f"{root.rstrip('/')}/{run}/{CONFIG_FILE}"
    try:
        with fsspec.open(url, "r") as f:
            saved = json.load(f)
    except FileNotFoundError:
        raise ValueError(
            f"no run named {run!r} under {root!r} (looked for {url}); pass --storage with the "
            f"run's checkpoint.dir"
        ) from None
    merged = OmegaConf.merge(OmegaConf.create(saved), OmegaConf.from_dotlist(list(overrides)))
    return from_dict(OmegaConf.to_container(merged, resolve=True))


def sync_run(run: str, storage: str | None) -> int:
    """`hyla sync RUN`: replay the run's tracking spool (see hyla.platform.outbox)."""
    check_run_name(run, "the run to sync")
    root = storage or compose([]).checkpoint.dir
    url = f"{root.rstrip('/')}/{run}/{SPOOL_FILE}"
    try:
        sent = replay(url)
    except Exception as e:
        raise ValueError(
            f"the tracking spool {url} could not be sent ({type(e).__name__}: {e}); is its "
            f"MLflow store up?"
        ) from None
    print(f"run {run}: {sent} tracking operations sent" if sent else f"run {run}: nothing to send")
    return 0


def _remember_config(cfg: JobConfig) -> None:
    """Save the run's config in its folder; a rerun under the same name must train the same
    model once the run has checkpoints (they would not fit another)."""
    url = f"{run_folder(cfg)}/{CONFIG_FILE}"
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        with fs.open(path, "r") as f:
            saved = from_dict(json.load(f))
        has_checkpoints = CheckpointStore(run_storage(cfg), cfg.checkpoint.keep_last).steps()
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


# Ray turns a loopback node address into the machine's external one, and then listens on
# every interface; its single-node mode (what it runs on macOS and Windows) keeps every
# process of the instance on loopback instead. gloo's sockets follow GLOO_SOCKET_IFNAME.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo"}


@contextmanager
def ray_connection(cfg: JobConfig) -> Iterator[bool]:
    """Use a running Ray (this process's, cluster.address or RAY_ADDRESS), else start an
    embedded one of its own, every process of it listening on loopback only, even when
    another Ray runs on the machine, and shut it down at the end. Yields whether it is the
    embedded one."""
    import ray

    if ray.is_initialized():
        yield False
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        _check_reachable(address)
        ray.init(address=address, log_to_driver=True)
    else:
        need = cfg.parallel.world_size * cfg.cluster.cpus_per_worker
        with _loopback_only():
            ray.init(  # the dashboard (and the state API Ray Train uses) on loopback too
                address="local",
                num_cpus=max(os.cpu_count() or 1, int(need + 0.999)),
                include_dashboard=True,
                dashboard_host="127.0.0.1",
            )
    try:
        yield not address
    finally:
        ray.shutdown()


@contextmanager
def _loopback_only() -> Iterator[None]:
    """The environment of an embedded Ray (its processes inherit it at start), restored
    afterwards. The node-address switch is a constant Ray reads once, at import: set it
    for an import that already happened too."""
    from ray._private import ray_constants

    saved = {key: os.environ.get(key) for key in LOOPBACK_ENV}
    cluster_mode = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(LOOPBACK_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_mode
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Ray retries an unreachable address for a minute; fail in seconds with its name."""
    if address == "auto":
        return
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot reach the Ray cluster at {address} (from cluster.address or RAY_ADDRESS): "
            f"{e}. Expected host:port of a running Ray head (GCS, port 6379 by default), or "
            f"unset both to start an embedded local Ray"
        ) from None


def train_job(cfg: JobConfig) -> dict[str, Any]:
    """Run the job on Ray Train; returns rank 0's summary (see Trainer.fit)."""
    import ray

    cfg = keep_global_batch(prepared(cfg))
    _check_storage(cfg, nodes=1)
    preflight(cfg, str(local_run_dir(cfg)))
    with ray_connection(cfg) as embedded:
        _check_storage(cfg, nodes=sum(1 for n in ray.nodes() if n["Alive"]))
        _check_resources(cfg)
        _remember_config(cfg)
        status = "FAILED"
        try:
            _fit_with_restarts(cfg, embedded)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if status != "FINISHED":  # workers that died could not end their MLflow run
                settle_run(f"{run_folder(cfg)}/{TRACKING_FILE}", status)
    with fsspec.open(f"{run_folder(cfg)}/{SUMMARY_FILE}", "r") as f:
        return json.load(f)


def _saved_global_batch(cfg: JobConfig) -> int | None:
    """The global batch the run trained with, from its newest complete checkpoint."""
    store = CheckpointStore(run_storage(cfg), cfg.checkpoint.keep_last)
    steps = store.steps()
    saved = store.shared_state(steps[-1]).get("data") if steps else None
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


def _sized(cfg: JobConfig) -> JobConfig:
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


class _GrowthWatch:
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


def _take_resize_request(cfg: JobConfig) -> bool:
    """Whether the attempt stopped to grow; the request is removed."""
    fs, path = fsspec.core.url_to_fs(f"{run_folder(cfg)}/{RESIZE_FILE}")
    if not fs.exists(path):
        return False
    fs.rm(path)
    return True


def _fit_with_restarts(cfg: JobConfig, embedded: bool) -> None:
    """trainer.fit(), started again after transient failures (each start resumes from the
    newest checkpoint); an input error in any worker ends it at once. An elastic run starts
    each attempt at the largest dp the cluster holds, and one that stopped to grow again."""
    from ray.train import TrainingFailedError

    failures = 0
    while True:
        attempt = _sized(cfg) if cfg.cluster.elastic else cfg
        watch = _GrowthWatch(attempt) if cfg.cluster.elastic else None
        try:
            _torch_trainer(attempt, embedded).fit()
        except TrainingFailedError as e:
            input_error = _input_error(e)
            if input_error is not None:
                raise ValueError(input_error) from None
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
        if not _take_resize_request(attempt):
            return
        log.warning("run %s: the cluster has room for more workers; growing", cfg.tracking.run_name)


def _input_error(error: Exception) -> str | None:
    """A worker's ValueError (hyla's input errors), which another attempt would only repeat."""
    for rank, failure in sorted(getattr(error, "worker_failures", {}).items()):
        if isinstance(failure, ValueError):
            return f"{failure} (raised by worker {rank})"
    return None


def _first_line(error: Exception) -> str:
    return next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)


def _torch_trainer(cfg: JobConfig, embedded: bool):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from hyla.jobs.loopback import LoopbackTorchConfig

    backend = "nccl" if cfg.cluster.use_gpu else "gloo"
    return TorchTrainer(
        _worker,
        train_loop_config={"job": cfg.to_dict()},
        torch_config=(LoopbackTorchConfig if embedded else TorchConfig)(backend=backend),
        scaling_config=ScalingConfig(
            num_workers=cfg.parallel.world_size,
            use_gpu=cfg.cluster.use_gpu,
            resources_per_worker={"CPU": cfg.cluster.cpus_per_worker},
        ),
        run_config=RunConfig(
            # Ray keeps only its own run state here: hyla's checkpoints are on checkpoint.dir,
            # which every worker reads and writes itself. Restarts are hyla's (see above).
            name=cfg.tracking.run_name,
            storage_path=str(local_run_dir(cfg) / "ray"),
            failure_config=FailureConfig(max_failures=0, controller_failure_limit=0),
        ),
    )


def _check_resources(cfg: JobConfig) -> None:
    """A cluster must hold the CPUs (and GPUs) of dp x sp workers, or Ray would wait for them
    forever."""
    import ray

    total = ray.cluster_resources()
    world = cfg.cluster.min_workers if cfg.cluster.elastic else cfg.parallel.world_size
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


def _mlflow_hint(uri: str, run_id: str | None) -> str:
    """How to look at the run: a server's page, or the `mlflow ui` command for a local store."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/runs/{run_id}" if run_id else uri
    return f"mlflow ui --backend-store-uri {uri}"


def _val_loss_text(val_loss: float) -> str:
    return "not evaluated (trainer.eval_batches=0)" if math.isnan(val_loss) else f"{val_loss:.4f}"


def _print_summary(summary: dict[str, Any]) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"hyla run {summary['run_name']}", show_header=False)
    rows = [
        ("final loss", f"{summary['final_loss']:.4f}"),
        ("validation loss", _val_loss_text(summary["val_loss"])),
        ("tokens/s", f"{summary['tokens_per_second']:,.0f}"),
        ("checkpoints", summary["checkpoint_url"]),
        ("MLflow run id", str(summary["run_id"])),
        ("MLflow", _mlflow_hint(summary["tracking_uri"], summary["run_id"])),
    ]
    if summary.get("resumed_from") is not None:
        rows.insert(0, ("resumed from step", str(summary["resumed_from"])))
    for row in rows:
        table.add_row(*row)
    Console(width=140).print(table)
    return 0
