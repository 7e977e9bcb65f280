"""`hyla train` on a real embedded Ray: end to end, recovery from a killed worker, and the
errors a driver must give before anything starts."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest
from mlflow import MlflowClient

from hyla.jobs.cli import main
from hyla.jobs.train import train_job
from hyla.platform.checkpoint import CheckpointStore
from hyla.platform.config import compose
from hyla.platform.trainer import Trainer, run_storage
from tests.jobs.ray_head import free_ports
from tests.platform.s3_server import S3_ENV, moto_s3

SMALL = [
    "data.seq_len=64",
    "data.batch_size=2",
    "data.max_documents=40",
    "trainer.eval_every=5",
    "trainer.eval_batches=1",
    "optim.warmup_steps=2",
]


def overrides(tmp_path, name: str, *extra: str) -> list[str]:
    return [
        *SMALL,
        f"checkpoint.dir={tmp_path}/store",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"tracking.run_name={name}",
        *extra,
    ]


def test_hyla_train_end_to_end(tmp_path, capsys, monkeypatch):
    """The README's command with small settings: sp = 2 workers on embedded Ray. Paths are
    relative to the driver's folder (workers run elsewhere: the driver makes them absolute)."""
    monkeypatch.chdir(tmp_path)
    relative = [*SMALL, "checkpoint.dir=store", "tracking.uri=sqlite:///mlflow.db"]
    assert main(["train", *relative, "tracking.run_name=e2e", "trainer.steps=4"]) == 0
    out = capsys.readouterr().out
    for expected in ("final loss", "tokens/s", f"{tmp_path}/store/e2e/checkpoints", "mlflow ui"):
        assert expected in out
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs(client.get_experiment_by_name("hyla").experiment_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["parallel.sp"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == [1, 2, 3, 4]
    comm = client.get_metric_history(run.info.run_id, "comm_bytes")
    assert min(m.value for m in comm) > 0  # LASP-2 states and gradients were exchanged

    # `hyla resume RUN` continues the same run from its checkpoint, with a longer schedule
    storage = ["--storage", "store"]
    assert main(["resume", "e2e", "trainer.steps=6", *storage]) == 0
    assert "resumed from step" in capsys.readouterr().out
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert len(client.search_runs(run.info.experiment_id)) == 1
    capsys.readouterr()
    assert main(["resume", "nope", *storage]) == 2
    assert "hyla: error: no run named 'nope' under" in capsys.readouterr().err

    # The default layout for a model with attention is zigzag, and it trains as one process
    # does: the same losses over the first 4 steps, trained with a 4-step schedule (float32
    # sums in another order: relative 1e-5 over 4 updates).
    assert run.data.params["parallel.sp_layout"] == "zigzag"
    losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    single = [*relative, "parallel=none", "tracking.experiment=single", "trainer.steps=4"]
    alone = Trainer(compose([*single, "tracking.run_name=alone"])).fit().losses
    for step, loss in alone.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step


def _kill_a_worker_after_first_checkpoint(cfg, killed: list[int]) -> None:
    """Once a checkpoint is complete, SIGKILL one Ray Train worker of this test's Ray."""
    store = CheckpointStore(run_storage(cfg), cfg.checkpoint.keep_last)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not store.steps():
        time.sleep(0.05)
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()) or "RayTrainWorker" in proc.name():
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(proc.pid)
                return
        except psutil.NoSuchProcess:
            continue


def test_killed_worker_recovers_with_the_uninterrupted_loss(tmp_path):
    steps = ["trainer.steps=16", "checkpoint.every=2"]
    whole = train_job(compose(overrides(tmp_path, "whole", *steps)))
    cfg = compose(overrides(tmp_path, "killed", *steps))
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint, args=(cfg, killed))
    killer.start()
    recovered = train_job(cfg)
    killer.join()
    assert killed, "no Ray Train worker was found to kill"
    assert recovered["resumed_from"] is not None  # the restarted group resumed
    assert recovered["final_loss"] == whole["final_loss"]  # bit-identical on CPU
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    history = client.get_metric_history(recovered["run_id"], "loss")
    assert sorted(m.step for m in history) == list(range(1, 17))  # one run, no gaps


def test_two_nodes_need_shared_storage(tmp_path, monkeypatch):
    """On a 2-node cluster (one CPU each, so the 2 workers land on different nodes) a local
    checkpoint.dir is refused, and s3:// storage (a moto server) works."""
    import fsspec
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.chdir(tmp_path)  # Ray's own run state goes to ./runs with remote storage
    with moto_s3() as endpoint:
        for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(key, value)  # before the nodes start: their workers inherit it
        fsspec.filesystem("s3").mkdir("hyla-nodes")
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        try:
            cluster.add_node(num_cpus=1)
            ray.init(address=cluster.address)
            try:
                with pytest.raises(ValueError, match=r"is a local path, but the Ray cluster has 2"):
                    train_job(compose(overrides(tmp_path, "local", "trainer.steps=2")))
                cfg = compose(
                    [
                        *overrides(tmp_path, "shared", "trainer.steps=2"),
                        "checkpoint.dir=s3://hyla-nodes/runs",
                    ]
                )
                summary = train_job(cfg)
                assert summary["checkpoint_url"] == "s3://hyla-nodes/runs/shared/checkpoints"
                store = CheckpointStore(summary["checkpoint_url"], cfg.checkpoint.keep_last)
                assert store.steps() == [2]
            finally:
                ray.shutdown()
        finally:
            cluster.shutdown()


def test_unreachable_cluster_fails_fast(tmp_path):
    (port,) = free_ports(1)
    start = time.monotonic()
    with pytest.raises(ValueError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        train_job(compose(overrides(tmp_path, "x", f"cluster.address=127.0.0.1:{port}")))
    assert time.monotonic() - start < 15


def test_memory_storage_is_refused_for_ray_workers(tmp_path):
    cfg = compose([*overrides(tmp_path, "m"), "checkpoint.dir=memory://x"])
    with pytest.raises(ValueError, match=r"checkpoint.dir 'memory://x' lives in one process"):
        train_job(cfg)
