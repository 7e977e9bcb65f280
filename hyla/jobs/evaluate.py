"""`hyla eval`: one checkpoint's model evaluated on Ray, as training runs (dp x sp workers,
so long sequences are split as in training), and the metrics logged to the run's MLflow run
at the checkpoint's step."""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

import fsspec

from hyla.jobs.embedded import ray_connection
from hyla.jobs.output import routed_output
from hyla.jobs.training_job import check_resources, prepared, torch_trainer, with_token_store
from hyla.platform.config import JobConfig, from_dict, with_overrides
from hyla.platform.evaluation import EVAL_METRICS
from hyla.platform.paths import console_log_file, local_run_dir, run_folder
from hyla.platform.preflight import preflight
from hyla.platform.run_outputs import TrainedCheckpoint


def eval_job(checkpoint: TrainedCheckpoint, cfg: JobConfig) -> dict[str, float]:
    """Evaluate `checkpoint` with `cfg` (the run's config with the user's data / parallel /
    trainer.eval_batches changes); returns the metrics under their eval_* names."""
    from mlflow import MlflowClient

    if cfg.model != checkpoint.cfg.model:
        raise ValueError("hyla eval evaluates the run's own model: model.* cannot be overridden")
    if cfg.trainer.eval_batches < 1:
        raise ValueError(f"--batches must be >= 1, got {cfg.trainer.eval_batches}")
    cfg = prepared(cfg)
    # rank 0 leaves its metrics here (Ray Train keeps only metrics that come with checkpoints)
    result_url = f"{run_folder(cfg)}/eval-{uuid.uuid4().hex[:12]}.json"
    with routed_output(console_log_file(cfg)):
        preflight(cfg, str(local_run_dir(cfg)), training=False)
        with ray_connection(cfg) as embedded:
            check_resources(cfg)
            cfg = with_token_store(cfg)  # a raw source: prepared once, not in every worker
            torch_trainer(
                cfg,
                embedded,
                worker=_eval_worker,
                extra={"step": checkpoint.step, "result_url": result_url},
                name=f"{cfg.tracking.run_name}-eval-{checkpoint.step}",
            ).fit()
    fs, path = fsspec.core.url_to_fs(result_url)
    with fs.open(path, "r") as f:
        reported = json.load(f)
    fs.rm(path)
    metrics = {EVAL_METRICS[k]: v for k, v in reported.items() if k in EVAL_METRICS}
    record = checkpoint.tracking()
    if record is not None and record.get("run_id"):
        client = MlflowClient(record["tracking_uri"])
        for key, value in metrics.items():
            client.log_metric(record["run_id"], key, value, step=checkpoint.step)
        metrics_run = record["run_id"]
    else:
        metrics_run = None
    return {**metrics, "step": checkpoint.step, "run_id": metrics_run}


def eval_config(checkpoint: TrainedCheckpoint, overrides: list[str], batches: int) -> JobConfig:
    """The run's config with `overrides` (data.*, parallel.*, cluster.*) and the batch count."""
    cfg = with_overrides(checkpoint.cfg, overrides)
    storage, run = checkpoint.folder.rstrip("/").rsplit("/", 1)  # where the run is now
    return dataclasses.replace(
        cfg,
        trainer=dataclasses.replace(cfg.trainer, eval_batches=batches),
        checkpoint=dataclasses.replace(cfg.checkpoint, dir=storage),
        tracking=dataclasses.replace(cfg.tracking, run_name=run),
    )


def _eval_worker(config: dict[str, Any]) -> None:
    """What every Ray Train worker of `hyla eval` runs."""
    import ray.train
    import ray.train.torch

    from hyla.platform.evaluation import evaluate_checkpoint

    cfg = from_dict(config["job"])
    device = ray.train.torch.get_device() if cfg.cluster.use_gpu else None
    metrics = evaluate_checkpoint(cfg, config["step"], device)
    if ray.train.get_context().get_world_rank() == 0:
        with fsspec.open(config["result_url"], "w") as f:
            json.dump(metrics, f)
