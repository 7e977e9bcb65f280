"""Where a run's files live: its folder under checkpoint.dir and the files in it. Light on
imports, so that the CLI and the trainer can share it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hyla.platform.config import JobConfig

CONFIG_FILE = "config.json"  # the run's config, saved by the driver at its first start
SUMMARY_FILE = "summary.json"  # rank 0's summary of the last session
# What waits for an unreachable MLflow store: one spool per MLflow run (hyla.platform.outbox).
SPOOL_DIR = "tracking-spool"
# The run's MLflow run, recorded by rank 0 as soon as there is one: a restart before the
# first checkpoint continues it (instead of opening a second run), and the driver ends it if
# the workers could not.
TRACKING_FILE = "tracking.json"
# Written by the driver of an elastic run when the cluster has room for more workers: the
# workers checkpoint and stop, and the driver starts them again at the larger dp.
RESIZE_FILE = "resize.json"
# Token stores that jobs prepared from raw sources, under checkpoint.dir, shared by its runs.
DATA_CACHE_DIR = "data-cache"
# What else checkpoint.dir may hold beside run folders: the default SQLite store (with its
# journal files, named mlflow.db-*), its artifacts, Ray's run state. No run is named so.
RESERVED_NAMES = (DATA_CACHE_DIR, "mlflow.db", "mlartifacts", "mlruns", "ray")
CONSOLE_LOG = "console.log"  # everything a job printed (the console shows a part of it)


def run_folder(cfg: JobConfig) -> str:
    """The run's folder on storage: <checkpoint.dir>/<run name>."""
    if not cfg.tracking.run_name:
        raise ValueError("tracking.run_name must be set before training (hyla train names runs)")
    return f"{cfg.checkpoint.dir.rstrip('/')}/{cfg.tracking.run_name}"


def run_storage(cfg: JobConfig) -> str:
    """Where this run's checkpoints live: <checkpoint.dir>/<run name>/checkpoints."""
    return f"{run_folder(cfg)}/checkpoints"


def local_run_dir(cfg: JobConfig) -> Path:
    """A local folder for the embedded MLflow store: checkpoint.dir when it is local."""
    root = cfg.checkpoint.dir
    if "://" in root and not root.startswith("file://"):
        return Path("runs").resolve()
    return Path(root.removeprefix("file://")).resolve()


def console_log_file(cfg: JobConfig) -> Path:
    """The run's console log, on this machine: in the run's folder when checkpoint.dir is
    local, else under ./runs/<run name>/."""
    return local_run_dir(cfg) / str(cfg.tracking.run_name) / CONSOLE_LOG
