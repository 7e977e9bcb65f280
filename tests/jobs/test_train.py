"""`hyla train` on a real embedded Ray: end to end, recovery from a killed worker, and the
errors a driver must give before anything starts."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from hyla.jobs.cli import main
from hyla.jobs.elastic import keep_global_batch
from hyla.jobs.training_job import resume_config, train_job
from hyla.platform.checkpoint import CheckpointStore
from hyla.platform.config import compose
from hyla.platform.paths import TRACKING_FILE, run_folder, run_storage
from hyla.platform.trainer import Trainer
from tests.jobs.ray_head import free_ports, ray_head
from tests.platform.s3_server import moto_s3_environment
from tests.platform.small_disk import small_disk

SMALL = [
    "data.seq_len=64",
    "data.batch_size=2",
    "data.max_documents=40",
    "trainer.eval_every=5",
    "trainer.eval_batches=1",
    "optim.warmup_steps=2",
    "tracking.log_model=false",  # tests/jobs/test_model_commands.py covers it
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

    # the workers read a token store the driver prepared once from the raw source
    (manifest,) = (tmp_path / "store" / "data-cache").glob("*/manifest.json")
    prepared_at = manifest.stat().st_mtime_ns

    # `hyla resume RUN` continues the same run from its checkpoint, with a longer schedule,
    # on the same store
    storage = ["--storage", "store"]
    assert main(["resume", "e2e", "trainer.steps=6", *storage]) == 0
    assert manifest.stat().st_mtime_ns == prepared_at
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


def _checkpointed(cfg) -> Callable[[], bool]:
    store = CheckpointStore(run_storage(cfg), cfg.checkpoint.keep_last)
    return lambda: bool(store.steps())


def _tracked(cfg) -> Callable[[], bool]:
    """The run has its MLflow run (rank 0 records it before the first step)."""
    return lambda: os.path.exists(f"{run_folder(cfg)}/{TRACKING_FILE}")


def _kill_a_worker_when(ready: Callable[[], bool], killed: list[int], done: threading.Event):
    """Once `ready()` (the run's own progress), SIGKILL one Ray Train worker of this test's
    Ray. It waits for as long as the run lasts."""
    while not ready():
        if done.wait(0.05):
            return
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()) or "RayTrainWorker" in proc.name():
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(proc.pid)
                return
        except psutil.NoSuchProcess:
            continue


@contextlib.contextmanager
def _a_worker_killed(ready: Callable[[], bool]) -> Iterator[list[int]]:
    """While the block runs a job: a thread that kills one of its workers once `ready()`;
    yields the list of the killed pids."""
    killed: list[int] = []
    done = threading.Event()
    killer = threading.Thread(target=_kill_a_worker_when, args=(ready, killed, done))
    killer.start()
    try:
        yield killed
    finally:
        done.set()
        killer.join()


def test_killed_worker_recovers_with_the_uninterrupted_loss(tmp_path):
    steps = ["trainer.steps=16", "checkpoint.every=2"]
    whole = train_job(compose(overrides(tmp_path, "whole", *steps)))
    cfg = compose(overrides(tmp_path, "killed", *steps))
    with _a_worker_killed(_checkpointed(cfg)) as killed:
        recovered = train_job(cfg)
    assert killed, "no Ray Train worker was found to kill"
    assert recovered["resumed_from"] is not None  # the restarted group resumed
    assert recovered["final_loss"] == whole["final_loss"]  # bit-identical on CPU
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    history = client.get_metric_history(recovered["run_id"], "loss")
    assert sorted(m.step for m in history) == list(range(1, 17))  # one run, no gaps


def test_a_crash_before_the_first_checkpoint_keeps_one_mlflow_run(tmp_path):
    """A worker killed after the MLflow run exists but before any checkpoint: the restarted
    group (which starts from scratch) continues that run instead of opening a second one."""
    cfg = compose(overrides(tmp_path, "early", "trainer.steps=6", "checkpoint.every=100"))
    with _a_worker_killed(_tracked(cfg)) as killed:
        summary = train_job(cfg)
    assert killed and summary["resumed_from"] is None
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs(client.get_experiment_by_name("hyla").experiment_id)
    assert run.info.run_id == summary["run_id"] and run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [
        *range(1, 7)
    ]


def test_two_nodes_need_shared_storage(tmp_path, monkeypatch):
    """On a 2-node cluster (one CPU each, so the 2 workers land on different nodes) a local
    checkpoint.dir is refused, and s3:// storage (a moto server) works."""
    import fsspec
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.chdir(tmp_path)  # Ray's own run state goes to ./runs with remote storage
    with moto_s3_environment(monkeypatch):  # workers inherit it
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


def _shrunk(url: str) -> Callable[[], bool]:
    """The newest checkpoint was written at dp = 1."""
    store = CheckpointStore(url, 3)

    def check() -> bool:
        steps = store.steps()
        return bool(steps) and store.shared_state(steps[-1])["data"]["dp"] == 1

    return check


def test_an_elastic_run_shrinks_and_grows_with_the_cluster(tmp_path, monkeypatch):
    """Two 1-CPU nodes, an elastic run of 1..2 workers at sp = 1 on s3 storage (moto): a
    node is removed mid-run and the run goes on at dp = 1 from its newest checkpoint; the node
    comes back and the run grows to dp = 2 again. One MLflow run, every step logged once, dp
    recorded at each step (2, then 1, then 2); the global batch (4) stays throughout."""
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.chdir(tmp_path)
    fast_health = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}
    with moto_s3_environment(monkeypatch):  # workers inherit it
        import fsspec

        fsspec.filesystem("s3").mkdir("hyla-elastic")
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 0, "_system_config": fast_health},
        )
        try:
            first = cluster.add_node(num_cpus=1)
            cluster.add_node(num_cpus=1)
            ray.init(address=cluster.address)
            cfg = compose(
                [
                    *overrides(tmp_path, "elastic", "trainer.steps=150", "checkpoint.every=2"),
                    "parallel=none",
                    "parallel.dp=2",
                    "data.batch_size=2",
                    "trainer.eval_batches=0",
                    "cluster.min_workers=1",
                    "cluster.max_workers=2",
                    "cluster.resize_interval=1",
                    "checkpoint.dir=s3://hyla-elastic/runs",
                ]
            )
            url = "s3://hyla-elastic/runs/elastic/checkpoints"
            result: dict = {}

            def run() -> None:
                try:
                    result["summary"] = train_job(cfg)
                except BaseException as e:  # reported by the test, not lost in the thread
                    result["error"] = e

            # Ray's nodes register signal handlers, so the cluster changes in the main thread
            # and the run in another.
            training = threading.Thread(target=run)
            training.start()
            store, shrunk = CheckpointStore(url, 3), _shrunk(url)
            while not store.steps() and training.is_alive():  # both workers are training
                training.join(0.1)
            if training.is_alive():
                cluster.remove_node(first, allow_graceful=False)
            while not shrunk() and training.is_alive():
                training.join(0.2)
            if training.is_alive():
                cluster.add_node(num_cpus=1)
            training.join()
            assert "error" not in result, result["error"]
            summary = result["summary"]
        finally:
            ray.shutdown()
            cluster.shutdown()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs(client.get_experiment_by_name("hyla").experiment_id)
    assert run.info.status == "FINISHED" and summary["run_id"] == run.info.run_id
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, 151))
    dps = [
        int(m.value)
        for m in sorted(client.get_metric_history(run.info.run_id, "dp"), key=lambda m: m.step)
    ]
    changes = [dp for i, dp in enumerate(dps) if i == 0 or dps[i - 1] != dp]
    assert changes == [2, 1, 2], changes


def test_unreachable_cluster_fails_fast(tmp_path):
    (port,) = free_ports(1)
    start = time.monotonic()
    with pytest.raises(ValueError, match=f"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        train_job(compose(overrides(tmp_path, "x", f"cluster.address=127.0.0.1:{port}")))
    assert time.monotonic() - start < 15


def test_a_cluster_too_small_for_the_job_is_an_error_not_a_wait(tmp_path):
    """A head with 1 CPU cannot hold the 2 workers of sp = 2: refused at once, naming what
    the cluster has and what the job needs (Ray would wait for the CPUs forever)."""
    with ray_head(num_cpus=1, token_auth=False) as head:
        cfg = compose(overrides(tmp_path, "small", f"cluster.address={head.gcs_address}"))
        with pytest.raises(ValueError, match=r"the Ray cluster has \{'CPU': 1\.0\} but .* need"):
            train_job(cfg)
    assert not (tmp_path / "store" / "small").exists()


def test_a_continued_run_keeps_its_global_batch(tmp_path, caplog):
    """Rerun at another dp, the driver keeps the run's global batch (dp x batch x
    accumulation): grad_accum first, then the batch size; a dp that does not divide it is
    refused before anything starts, naming the dp values that would work."""
    one_step = ["trainer.steps=1", "optim.warmup_steps=1"]
    Trainer(compose(overrides(tmp_path, "gb", "parallel=none", *one_step))).fit()
    # the run's global batch: 1 x 2 x 1 = 2 (SMALL's data.batch_size=2)
    cfg = compose(overrides(tmp_path, "gb", "parallel=none", "data.batch_size=1"))
    with caplog.at_level("WARNING", logger="hyla.jobs.training_job"):
        kept = keep_global_batch(cfg)
    assert (kept.data.batch_size, kept.trainer.grad_accum) == (1, 2)
    assert "trainer.grad_accum 1 -> 2" in caplog.text
    wide = compose(overrides(tmp_path, "gb", "parallel.dp=2", "data.batch_size=2"))
    kept = keep_global_batch(wide)
    assert (kept.parallel.dp, kept.data.batch_size, kept.trainer.grad_accum) == (2, 1, 1)
    with pytest.raises(
        ValueError, match=r"parallel.dp = 4 does not divide; use parallel.dp in \[1, 2\]"
    ):
        keep_global_batch(compose(overrides(tmp_path, "gb", "parallel.dp=4")))


def test_memory_storage_is_refused_for_ray_workers(tmp_path):
    cfg = compose([*overrides(tmp_path, "m"), "checkpoint.dir=memory://x"])
    with pytest.raises(ValueError, match=r"checkpoint.dir 'memory://x' lives in one process"):
        train_job(cfg)


# ------------------------------------------------------------------ failing fast and safely


def _jsonl(path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def _bad_inputs(tmp_path) -> dict[str, tuple[list[str], str]]:
    """name -> (overrides, the message expected after `hyla: error: `)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    good = [json.dumps({"text": "def f(x):\n    return x\n" * 20})] * 30
    bad_json = _jsonl(tmp_path / "bad.jsonl", [good[0], "{not json"])
    no_field = _jsonl(tmp_path / "nofield.jsonl", [json.dumps({"body": "x"})])
    (tmp_path / "text-only.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    (port,) = free_ports(1)
    return {
        "missing file": ([f"data.source={tmp_path}/missing.txt"], "cannot be read"),
        "empty glob": ([f"data.source={tmp_path}/empty/*.txt"], "matched no files"),
        "malformed jsonl": ([f"data.source={bad_json}"], r"bad.jsonl line 2 column 2 is not JSON"),
        "jsonl field": ([f"data.source={no_field}"], r"data.text_field 'text' is missing in"),
        "parquet": (
            [f"data.source={tmp_path}/text-only.parquet"],
            r"text-only.parquet is not parquet with a column data.text_field='text'",
        ),
        "unknown protocol": (["data.source=nope://x/y.txt"], "is not a readable fsspec URL"),
        "checkpoint protocol": (["checkpoint.dir=nope://x"], "is not a usable fsspec URL"),
        "unwritable storage": ([f"checkpoint.dir={tmp_path}/a-file/runs"], "is not writable"),
        "missing tokenizer": (
            [f"data.tokenizer={tmp_path}/tok.json", "data.eos_token=eos"],
            "is not a readable tokenizers JSON file",
        ),
        "unreachable tracking": (
            [f"tracking.uri=http://127.0.0.1:{port}"],
            "the MLflow tracking store .* does not work",
        ),
        "malformed tracking": (["tracking.uri=nope:///x"], "does not work"),
        "too little data": (
            ["data.seq_len=100000"],
            r"holds \d+ tokens of validation documents, fewer than the 800001",
        ),
        "seed": (["trainer.seed=abc"], "trainer.seed must be an integer, got 'abc'"),
        "vocab": (["model.vocab_size=300.5"], "model.vocab_size must be an integer, got 300.5"),
    }


@pytest.mark.parametrize(
    "name",
    [
        "missing file",
        "empty glob",
        "malformed jsonl",
        "jsonl field",
        "parquet",
        "unknown protocol",
        "checkpoint protocol",
        "unwritable storage",
        "missing tokenizer",
        "unreachable tracking",
        "malformed tracking",
        "too little data",
        "seed",
        "vocab",
    ],
)
def test_bad_input_fails_before_anything_starts(tmp_path, capsys, name):
    """One clear line and exit code 2, from the driver: Ray never starts, no worker runs,
    and nothing is written under the run's name (a corrected rerun is not blocked)."""
    import ray

    extra, message = _bad_inputs(tmp_path)[name]
    code = main(["train", *overrides(tmp_path, "bad", "trainer.steps=2"), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(rf"^hyla: error: .*{message}", err, re.MULTILINE), err
    assert "Traceback" not in err
    assert not ray.is_initialized()
    assert not (tmp_path / "store" / "bad").exists()


def test_an_input_error_deep_in_the_data_ends_the_run_at_once(tmp_path, capsys, caplog):
    """A malformed line deep in the data passes the preflight (it reads only what one batch
    needs) and fails where the driver prepares the source's token store: the run ends once,
    with that error naming the line, before any worker starts."""
    doc = json.dumps({"text": "def f(x):\n    return x\n" * 20})
    source = _jsonl(tmp_path / "late.jsonl", [doc] * 300 + ["{broken"])
    argv = ["train", *overrides(tmp_path, "late", "trainer.steps=2", "data.max_documents=null")]
    argv.append(f"data.source={source}")
    with caplog.at_level("WARNING", logger="hyla.jobs.elastic"):
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert "hyla: error: data.source file" in err and "line 301 column 2 is not JSON" in err
    assert "restart" not in caplog.text  # no second attempt
    assert not (tmp_path / "store" / "late" / "checkpoints").exists()


def test_a_run_that_fails_leaves_its_mlflow_run_failed(tmp_path):
    """A worker killed with no restarts left (cluster.max_failures=0): the driver reports it
    and marks the one MLflow run FAILED (the killed worker could not)."""
    steps = ["trainer.steps=16", "checkpoint.every=2", "cluster.max_failures=0"]
    cfg = compose(overrides(tmp_path, "dies", *steps))
    with (
        _a_worker_killed(_checkpointed(cfg)) as killed,
        pytest.raises(RuntimeError, match=r"more than cluster\.max_failures = 0"),
    ):
        train_job(cfg)
    assert killed
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs(client.get_experiment_by_name("hyla").experiment_id)
    assert run.info.status == "FAILED"


def _listeners(root: psutil.Process) -> dict[str, set[str]]:
    """Listening addresses of a process and all its descendants: {ip: {process names}}."""
    found: dict[str, set[str]] = {}
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.setdefault(conn.laddr.ip, set()).add(proc.name())
    return found


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def test_embedded_ray_is_its_own_and_listens_on_loopback_only(tmp_path):
    """With another Ray head running where a bare ray.init() finds it, `hyla train` still
    starts an embedded Ray of its own; during the run, every listening socket of its whole
    process tree (GCS, raylet, agents, dashboard, controller, workers, the torch store and
    gloo) is on loopback."""
    base = Path(tempfile.mkdtemp(prefix="hyla-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(base)
    try:
        tmpdir = {"RAY_TMPDIR": str(base)}
        with ray_head(1, token_auth=False, temp_dir=base / "ray", extra_env=tmpdir) as head:
            while not (base / "ray" / "ray_current_cluster").exists():  # `ray start` is done
                time.sleep(0.2)
            found = subprocess.run(
                [sys.executable, "-c", "import ray; print(ray.init().address_info['gcs_address'])"],
                env={**env, "RAY_AUTH_MODE": "disabled"},
                capture_output=True,
                text=True,
                timeout=300,
            )
            head_port = head.gcs_address.rsplit(":", 1)[1]
            assert found.stdout.strip().endswith(f":{head_port}"), found.stderr[-2000:]
            argv = [
                "hyla", "train", *SMALL, "trainer.steps=40", "checkpoint.every=5",
                f"checkpoint.dir={tmp_path}/store", f"tracking.uri=sqlite:///{tmp_path}/m.db",
                "tracking.run_name=loop",
            ]  # fmt: skip
            job = subprocess.Popen(
                [str(Path(sys.executable).parent / a) if a == "hyla" else a for a in argv],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                store = CheckpointStore(f"{tmp_path}/store/loop/checkpoints", 3)
                while not store.steps():  # the run is up: workers, process group, all of it
                    assert job.poll() is None, job.stderr.read().decode()[-3000:]
                    time.sleep(0.2)
                listeners = _listeners(psutil.Process(job.pid))
            finally:
                _, err = job.communicate(timeout=900)
            assert job.returncode == 0, err.decode()[-3000:]
            assert listeners and all(_loopback(ip) for ip in listeners), listeners
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_run_cleanly_and_it_resumes(tmp_path, signum):
    """SIGTERM or SIGINT to a real `hyla train` process (its own embedded Ray) once a
    checkpoint is committed: one line saying what happened and how to resume, exit code
    128 + the signal, no Ray dump, the MLflow run KILLED and no unfinished save left; then
    `hyla resume` continues from that checkpoint, in the same MLflow run, with one point per
    step."""
    argv = overrides(tmp_path, "stopped", "trainer.steps=400", "checkpoint.every=2")
    job = subprocess.Popen(
        [sys.executable, "-m", "hyla.jobs.cli", "train", *argv],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    checkpoints = tmp_path / "store" / "stopped" / "checkpoints"
    store = CheckpointStore(str(checkpoints), 3)
    try:
        while not store.steps():  # a checkpoint is committed: the run is well under way
            assert job.poll() is None, job.stderr.read()[-3000:]
            time.sleep(0.2)
        job.send_signal(signum)
        _, err = job.communicate(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    name = signal.Signals(signum).name
    assert job.returncode == 128 + signum, err[-3000:]
    last = err.strip().splitlines()[-1]
    stopped = re.fullmatch(
        rf"hyla: stopped by {name}: run stopped is marked KILLED and continues from its "
        rf"last checkpoint, step (\d+), with `hyla resume stopped --storage (\S+)`",
        last,
    )
    assert stopped, err[-3000:]
    assert "Traceback" not in err and "SIGTERM received" not in err, err[-3000:]
    step = int(stopped.group(1))
    assert step == store.latest() and 2 <= step < 400
    assert not [p.name for p in checkpoints.iterdir() if ".tmp-" in p.name]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs(client.get_experiment_by_name("hyla").experiment_id)
    assert run.info.status == "KILLED"
    logged = max(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    end = logged + 2  # past every step the stopped session logged
    more = [f"trainer.steps={end}", "checkpoint.every=100"]
    resumed = train_job(resume_config("stopped", more, stopped.group(2)))
    assert (resumed["resumed_from"], resumed["run_id"]) == (step, run.info.run_id)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, end + 1))


def test_a_full_disk_ends_the_run_at_once_naming_it(tmp_path, capsys, caplog):
    """The run's checkpoints folder on a real 1 MiB file system, too small for the first
    checkpoint: the run ends at its first save, without a restart, with one line naming
    ENOSPC and the file; no unfinished save is left and the MLflow run is FAILED."""
    with small_disk(tmp_path / "store" / "full" / "checkpoints", "1m") as disk:
        argv = overrides(tmp_path, "full", "parallel=none", "trainer.steps=4", "checkpoint.every=2")
        with caplog.at_level("WARNING", logger="hyla.jobs.training_job"):
            assert main(["train", *argv]) == 1
        err = capsys.readouterr().err
        assert re.search(
            rf"^hyla: error: ENOSPC: no space left on the checkpoint storage writing "
            rf"{disk}/step-00000002\.tmp-[0-9a-f]+/\S+: the checkpoint of step 2 needs about "
            r"[\d,]+ bytes from this rank, .* \(raised by worker 0\)$",
            err,
            re.MULTILINE,
        ), err
        assert "restart" not in caplog.text
        assert list(disk.iterdir()) == []
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs(client.get_experiment_by_name("hyla").experiment_id)
    assert run.info.status == "FAILED"
