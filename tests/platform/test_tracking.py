"""MLflow tracking: one run continued across a resume, with the embedded SQLite store and with
a real `mlflow server` over HTTP; ranks other than 0 write nothing; clear errors."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import fsspec
import pytest
import yaml
from mlflow import MlflowClient

from hyla.jobs.cli import main
from hyla.platform.config import TrackingConfig, compose
from hyla.platform.paths import SPOOL_DIR
from hyla.platform.tracking import LAST_CHECKPOINT_TAG, Tracker, resolve_tracking_uri
from hyla.platform.trainer import Trainer
from tests.platform.mlflow_server import MlflowServer, free_port, mlflow_server
from tests.platform.s3_server import moto_s3_environment


@dataclasses.dataclass
class Store:
    cfg: TrackingConfig
    run_dir: Path
    kind: str  # "sqlite" or "http"

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(resolve_tracking_uri(self.cfg, str(self.run_dir)))


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory) -> Path:
    """An empty SQLite store: creating one runs MLflow's migrations, which take seconds."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def seed(run_dir: Path, empty_db: Path) -> None:
    """Give run_dir a copy of the empty store (the SQLite tracking store of the run)."""
    run_dir.mkdir(parents=True)
    shutil.copy(empty_db, run_dir / "mlflow.db")


@pytest.fixture(params=["sqlite", "http"])
def store(request, tmp_path, monkeypatch) -> Store:
    """A TrackingConfig with its own experiment: the default SQLite store under the run
    directory, or the module's mlflow server. The cwd is an empty folder that must stay so."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    uri = request.getfixturevalue("server_url") if request.param == "http" else None
    cfg = TrackingConfig(uri=uri, experiment=f"exp-{tmp_path.name}", system_metrics=False)
    return Store(cfg, tmp_path / "run", request.param)


def job_params(store: Store) -> tuple[dict, str]:
    """The real job config's flat params and YAML."""
    job = compose(["model=tiny", "trainer.steps=10"])
    job.tracking = store.cfg
    return job.flat(), yaml.safe_dump(job.to_dict(), sort_keys=False)


def metrics_at(step: int) -> dict[str, float]:
    return {"loss": 10.0 / step, "lr": 1e-3 * step, "grad_norm": 0.5 + step}


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]


def artifact_text(client: MlflowClient, run_id: str, path: str, tmp: Path) -> str:
    return Path(client.download_artifacts(run_id, path, str(tmp))).read_text()


def test_run_continues_across_resume(store, tmp_path):
    """Steps 1..6, a crash, a resume from step 3 re-logging 4..10: one run whose history holds
    each step once, with params, config, checkpoints and system metrics."""
    cfg = dataclasses.replace(store.cfg, system_metrics=True, system_metrics_interval=0.2)
    params, config_yaml = job_params(store)
    client = store.client

    first = Tracker(cfg, str(store.run_dir), rank=0)
    run_id = first.start(None, params, config_yaml)
    for step in range(1, 7):
        first.log_metrics(metrics_at(step), step)
    first.log_checkpoint("memory://ckpt/step-000006", 6)
    wait_for(lambda: "system/cpu_utilization_percentage" in client.get_run(run_id).data.metrics)
    first.finish("FAILED")
    assert client.get_run(run_id).info.status == "FAILED"
    assert not monitor_threads()

    second = Tracker(cfg, str(store.run_dir), rank=0)
    assert second.start(run_id, params, config_yaml) == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    for step in range(4, 11):
        second.log_metrics(metrics_at(step), step)
    second.log_checkpoint("memory://ckpt/step-000010", 10)
    second.finish()
    assert not monitor_threads()

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("loss", "lr", "grad_norm"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert history == [(s, metrics_at(s)[key]) for s in range(1, 11)], key
    assert run.data.params == {key: str(value) for key, value in params.items()}
    assert run.data.params["model.d_model"] == "64"
    artifacts = sorted(a.path for a in client.list_artifacts(run_id))
    assert artifacts == ["checkpoints", "config.yaml"]
    assert artifact_text(client, run_id, "config.yaml", tmp_path) == config_yaml
    records = [
        json.loads(artifact_text(client, run_id, a.path, tmp_path))
        for a in client.list_artifacts(run_id, "checkpoints")
    ]
    assert records == [
        {"step": 6, "url": "memory://ckpt/step-000006"},
        {"step": 10, "url": "memory://ckpt/step-000010"},
    ]
    assert run.data.tags[LAST_CHECKPOINT_TAG] == "memory://ckpt/step-000010"
    experiment = client.get_experiment_by_name(cfg.experiment)
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    assert not list(Path.cwd().iterdir())  # nothing written to the cwd (mlflow's ./mlruns)
    if store.kind == "sqlite":
        assert (store.run_dir / "mlflow.db").is_file()
        assert run.info.artifact_uri.startswith((store.run_dir / "mlartifacts").as_uri())


def test_params_are_chunked_cut_and_immutable_on_resume(store, empty_db, tmp_path, caplog):
    """250 params (MLflow takes 100 per batch) with one longer than MLflow's 6000 characters;
    on resume a changed value keeps the original, a new key is added, the new config is kept."""
    seed(store.run_dir, empty_db)
    params = {f"group.key_{i:03d}": i for i in range(249)} | {"group.long": "x" * 7000}
    tracker = Tracker(store.cfg, str(store.run_dir), rank=0)
    run_id = tracker.start(None, params, "version: 1\n")
    tracker.finish("KILLED")
    client = store.client
    stored = client.get_run(run_id).data.params
    assert len(stored) == 250
    assert stored["group.key_248"] == "248"
    assert stored["group.long"] == "x" * 6000

    changed = params | {"group.key_007": "seven", "group.new": 1.5}
    resumed = Tracker(store.cfg, str(store.run_dir), rank=0)
    with caplog.at_level("WARNING", logger="hyla.platform.tracking"):
        resumed.start(run_id, changed, "version: 2\n")
    resumed.finish()
    assert "group.key_007" in caplog.text
    stored = client.get_run(run_id).data.params
    assert (stored["group.key_007"], stored["group.new"], len(stored)) == ("7", "1.5", 251)
    assert artifact_text(client, run_id, "config.yaml", tmp_path / "a") == "version: 1\n"
    assert artifact_text(client, run_id, "config-resume-1.yaml", tmp_path / "b") == "version: 2\n"


def test_other_ranks_write_nothing(store, empty_db):
    """Rank 1 makes every call and writes nothing; rank 0, making the same calls, writes."""
    params, config_yaml = job_params(store)

    def session(rank: int) -> str | None:
        tracker = Tracker(store.cfg, str(store.run_dir), rank=rank)
        run_id = tracker.start(None, params, config_yaml)
        tracker.log_metrics(metrics_at(1), 1)
        tracker.log_checkpoint("memory://ckpt/1", 1)
        tracker.finish()
        return run_id

    assert session(1) is None
    assert not store.run_dir.exists()
    if store.kind == "sqlite":
        seed(store.run_dir, empty_db)
    assert store.client.get_experiment_by_name(store.cfg.experiment) is None
    run_id = session(0)
    experiment = store.client.get_experiment_by_name(store.cfg.experiment)
    assert [r.info.run_id for r in store.client.search_runs([experiment.experiment_id])] == [run_id]


def test_unreachable_server_fails_fast_naming_it(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    tracker = Tracker(TrackingConfig(uri=uri), str(tmp_path), rank=0)
    began = time.monotonic()
    with pytest.raises(ConnectionError, match=uri):
        tracker.start(None, {"a": 1}, "a: 1\n")
    assert time.monotonic() - began < 5
    assert not monitor_threads()
    with pytest.raises(RuntimeError, match="start"):
        tracker.log_metrics({"loss": 1.0}, 1)


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    default = TrackingConfig()
    assert resolve_tracking_uri(default, "runs/a") == f"sqlite:///{tmp_path}/runs/a/mlflow.db"
    from_url = resolve_tracking_uri(default, (tmp_path / "b").as_uri())
    assert from_url == f"sqlite:///{tmp_path}/b/mlflow.db"
    with pytest.raises(ValueError, match="s3://bucket/run"):
        resolve_tracking_uri(default, "s3://bucket/run")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri(default, "s3://bucket/run") == "http://127.0.0.1:1"
    explicit = TrackingConfig(uri="sqlite:////tmp/x.db")
    assert resolve_tracking_uri(explicit, "runs/a") == "sqlite:////tmp/x.db"


def test_bad_input_is_named(tmp_path, monkeypatch, empty_db):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    seed(tmp_path / "run", empty_db)
    cfg = TrackingConfig(system_metrics=False)
    with pytest.raises(ValueError, match="rank must be an integer >= 0, got -1"):
        Tracker(cfg, str(tmp_path), rank=-1)
    with pytest.raises(ValueError, match=r"tracking\.system_metrics_interval"):
        TrackingConfig(system_metrics_interval=0)
    tracker = Tracker(cfg, str(tmp_path / "run"), rank=0)
    with pytest.raises(RuntimeError, match="start"):
        tracker.log_checkpoint("memory://c", 1)
    with pytest.raises(ValueError, match="'0123456789abcdef0123456789abcdef'"):
        tracker.start("0123456789abcdef0123456789abcdef", {}, "")
    tracker.start(None, {}, "")  # a failed start leaves the tracker ready for another
    with pytest.raises(ValueError, match="step must be an integer >= 0, got -1"):
        tracker.log_metrics({"loss": 1.0}, -1)
    with pytest.raises(ValueError, match=r"status must be one of .* got 'DONE'"):
        tracker.finish("DONE")
    tracker.finish()


def _outage_job(tmp_path: Path, url: str, name: str, *extra: str):
    return compose(
        [
            "parallel=none",
            "data.seq_len=64",
            "data.batch_size=2",
            "data.max_documents=40",
            "trainer.steps=8",
            "optim.warmup_steps=2",
            "trainer.eval_batches=0",
            "checkpoint.every=3",
            f"checkpoint.dir={tmp_path}/store",
            f"tracking.uri={url}",
            f"tracking.run_name={name}",
            "tracking.system_metrics=false",
            "tracking.retry_interval=0.2",
            *extra,
        ]
    )


def _tracked(client: MlflowClient, run_id: str) -> tuple[list[int], list[str]]:
    steps = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
    checkpoints = sorted(a.path for a in client.list_artifacts(run_id, "checkpoints"))
    return steps, checkpoints


def test_training_outlives_its_tracking_server(tmp_path, caplog):
    """The real server is stopped after step 2 and started again after step 5: training goes
    on meanwhile, the points of steps 3-5 (and the checkpoint of step 3) wait in the spool,
    and they reach MLflow in order, without duplicates; one warning each way."""
    server = MlflowServer(tmp_path / "server")
    server.start()
    try:

        def report(step: int, metrics: dict) -> None:
            if step == 2:
                server.stop()
            if step == 5:
                server.start()

        cfg = _outage_job(tmp_path, server.url, "outage")
        with caplog.at_level("WARNING", logger="hyla.platform.outbox"):
            result = Trainer(cfg).fit(report=report)
        assert sorted(result.losses) == list(range(1, 9))
        client = MlflowClient(server.url)
        steps, checkpoints = _tracked(client, result.run_id)
        assert steps == list(range(1, 9))  # every point, each once
        assert checkpoints == [f"checkpoints/{s:09d}.json" for s in (3, 6, 8)]
        assert client.get_run(result.run_id).info.status == "FINISHED"
        assert caplog.text.count("is unreachable") == 1
        assert caplog.text.count("answers again") == 1
        assert not spool_files(tmp_path / "store/outage")
    finally:
        server.stop()


def test_hyla_sync_sends_what_waited_for_the_store(tmp_path, capsys):
    """The server goes away at step 2 for the rest of the run: the run ends (after
    tracking.finish_timeout) with its points in the spool; `hyla sync RUN` sends them once
    the server is back, the run's end included."""
    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        cfg = _outage_job(tmp_path, server.url, "later", "tracking.finish_timeout=0.5")
        result = Trainer(cfg).fit(report=lambda step, m: server.stop() if step == 2 else None)
        assert spool_files(tmp_path / "store/later")
        server.start()
        assert main(["sync", "later", "--storage", f"{tmp_path}/store"]) == 0
        assert "tracking operations sent" in capsys.readouterr().out
        client = MlflowClient(server.url)
        assert _tracked(client, result.run_id)[0] == list(range(1, 9))
        assert client.get_run(result.run_id).info.status == "FINISHED"
        assert not spool_files(tmp_path / "store/later")
        assert main(["sync", "later", "--storage", f"{tmp_path}/store"]) == 0
        assert "nothing to send" in capsys.readouterr().out
    finally:
        server.stop()


# ---------------------------------------------------------------- the spool


@pytest.fixture
def server(tmp_path):
    """A real mlflow server of the test's own, which the test stops and starts."""
    server = MlflowServer(tmp_path / "server")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def spool_cfg(server: MlflowServer, **changes) -> TrackingConfig:
    """Sessions that end with the server up wait for it as long as it takes to send."""
    base = {"retry_interval": 0.2, "finish_timeout": 60.0}
    return TrackingConfig(
        uri=server.url,
        experiment="spool",
        run_name="spooled",
        system_metrics=False,
        **(base | changes),
    )


def spool_files(run_dir: Path) -> list[Path]:
    """The spool files under the run folder (whatever their layout), without lock files."""
    return sorted(
        p
        for p in run_dir.rglob("*")
        if p.is_file() and "spool" in str(p.relative_to(run_dir)) and p.name != "lock"
    )


def offline_session(
    server: MlflowServer, run_dir: Path, run_id: str | None, steps: range, status: str
) -> str:
    """A session of the run that loses its server after start: its steps stay spooled."""
    tracker = Tracker(spool_cfg(server, finish_timeout=0.2), str(run_dir), rank=0)
    run_id = tracker.start(run_id, {}, "")
    assert run_id is not None
    server.stop()
    for step in steps:
        tracker.log_metrics(metrics_at(step), step)
    tracker.finish(status)
    assert spool_files(run_dir)
    return run_id


def loss_steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "loss"))


def test_spool_is_appended_line_by_line(server, tmp_path):
    """While the store is lost, every operation reaches the spool as a line of its own,
    appended: what was written before stays as it was."""
    tracker = Tracker(spool_cfg(server, retry_interval=3600), str(tmp_path / "run"), rank=0)
    tracker.start(None, {}, "")
    server.stop()
    tracker.log_metrics(metrics_at(1), 1)
    wait_for(lambda: bool(spool_files(tmp_path / "run")))
    (spool,) = spool_files(tmp_path / "run")
    wait_for(lambda: "loss" in spool.read_text())
    before = spool.read_bytes()
    for step in (2, 3):
        tracker.log_metrics(metrics_at(step), step)
    wait_for(lambda: spool.read_text().count('"metrics"') == 3)
    after = spool.read_bytes()
    assert after.startswith(before) and after.endswith(b"\n")
    records = [json.loads(line) for line in after.splitlines()]
    assert [r["step"] for r in records if r.get("kind") == "metrics"] == [1, 2, 3]
    server.start()
    tracker.finish()
    assert not spool_files(tmp_path / "run")


def test_torn_spool_line_is_skipped_with_a_warning(server, tmp_path, caplog):
    """A spool whose last line was cut short (a crash while writing) loses that record only:
    the next session of the run warns, sends the rest and trains on."""
    run_dir = tmp_path / "run"
    run_id = offline_session(server, run_dir, None, range(1, 4), "KILLED")
    (spool,) = spool_files(run_dir)
    spool.write_bytes(spool.read_bytes()[:-12])  # tears the end status record
    server.start()
    tracker = Tracker(spool_cfg(server), str(run_dir), rank=0)
    with caplog.at_level("WARNING", logger="hyla.platform.outbox"):
        tracker.start(run_id, {}, "")
        tracker.log_metrics(metrics_at(4), 4)
        tracker.finish()
    assert "torn" in caplog.text and str(spool.name) in caplog.text
    client = MlflowClient(server.url)
    assert loss_steps(client, run_id) == [1, 2, 3, 4]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not spool_files(run_dir)


def test_spool_of_another_run_is_kept(server, tmp_path, capsys):
    """Two MLflow runs that end offline in one run folder each keep their spool; `hyla sync`
    sends both."""
    run_dir = tmp_path / "store" / "spooled"
    first = offline_session(server, run_dir, None, range(1, 4), "FAILED")
    server.start()
    second = offline_session(server, run_dir, None, range(1, 3), "FINISHED")
    assert len(spool_files(run_dir)) == 2
    server.start()
    assert main(["sync", "spooled", "--storage", str(tmp_path / "store")]) == 0
    assert "sent" in capsys.readouterr().out
    client = MlflowClient(server.url)
    assert loss_steps(client, first) == [1, 2, 3]
    assert loss_steps(client, second) == [1, 2]
    assert client.get_run(first).info.status == "FAILED"
    assert client.get_run(second).info.status == "FINISHED"
    assert not spool_files(run_dir)


def test_resumed_run_does_not_replay_the_end_of_its_last_attempt(server, tmp_path):
    """An attempt that ended FAILED while offline spooled that status; the next attempt
    replays the points but not the end: the run is RUNNING while it trains."""
    run_dir = tmp_path / "run"
    run_id = offline_session(server, run_dir, None, range(1, 3), "FAILED")
    server.start()
    client = MlflowClient(server.url)
    tracker = Tracker(spool_cfg(server), str(run_dir), rank=0)
    tracker.start(run_id, {}, "")
    wait_for(lambda: not spool_files(run_dir))  # the old spool is sent
    assert loss_steps(client, run_id) == [1, 2]
    assert client.get_run(run_id).info.status == "RUNNING"
    tracker.finish()
    assert client.get_run(run_id).info.status == "FINISHED"


def test_sync_waits_for_the_session_that_holds_the_spool(server, tmp_path):
    """`hyla sync` refuses a spool that a running session still writes, naming why; the
    session sends it itself once the store is back."""
    run_dir = tmp_path / "store" / "spooled"
    tracker = Tracker(spool_cfg(server, retry_interval=3600), str(run_dir), rank=0)
    run_id = tracker.start(None, {}, "")
    server.stop()
    tracker.log_metrics(metrics_at(1), 1)
    wait_for(lambda: bool(spool_files(run_dir)) and "loss" in spool_files(run_dir)[0].read_text())
    server.start()
    with pytest.raises(ValueError, match="in use"):
        main(["--debug", "sync", "spooled", "--storage", str(tmp_path / "store")])
    tracker.finish()
    client = MlflowClient(server.url)
    assert loss_steps(client, run_id) == [1]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not spool_files(run_dir)


def test_a_spool_on_s3_waits_there_and_is_sent(server, tmp_path, monkeypatch, capsys):
    """The run folder on S3 (a moto server): a session that loses its store spools there,
    one object for the MLflow run, header first and one line per record, and its lock object
    goes when it ends. A lock object left by a session that died makes `hyla sync` refuse,
    naming it; once it is deleted, `hyla sync RUN --storage s3://...` sends every point and
    the end, and the spool goes."""
    with moto_s3_environment(monkeypatch):
        fs = fsspec.filesystem("s3")
        fs.makedirs("hyla-spool", exist_ok=True)
        storage = f"s3://hyla-spool/{uuid.uuid4().hex[:8]}"
        spools = f"{storage}/spooled/{SPOOL_DIR}"
        cfg = spool_cfg(server, finish_timeout=0.2)
        tracker = Tracker(cfg, str(tmp_path / "local"), rank=0, spool_dir=spools)
        run_id = tracker.start(None, {}, "")
        server.stop()
        for step in range(1, 4):
            tracker.log_metrics(metrics_at(step), step)
        tracker.finish("FAILED")
        fs.invalidate_cache()
        spool = f"{spools.removeprefix('s3://')}/{run_id}.jsonl"
        assert fs.find(spools) == [spool]  # no lock left
        header, *records = [json.loads(line) for line in fs.cat_file(spool).splitlines()]
        assert header == {"run_id": run_id, "tracking_uri": server.url}
        assert [r.get("step", r.get("status")) for r in records] == [1, 2, 3, "FAILED"]

        lock = f"{spools}/lock"
        fs.pipe_file(lock, b'{"host": "gone", "pid": 1}')
        server.start()
        with pytest.raises(ValueError, match=rf"in use .*\(lock {lock}\)"):
            main(["--debug", "sync", "spooled", "--storage", storage])
        fs.rm(lock)
        assert main(["sync", "spooled", "--storage", storage]) == 0
        assert "run spooled: 4 tracking operations sent" in capsys.readouterr().out
        client = MlflowClient(server.url)
        assert loss_steps(client, run_id) == [1, 2, 3]
        assert client.get_run(run_id).info.status == "FAILED"
        fs.invalidate_cache()
        assert fs.find(spools) == []


def _legacy_spool(run_dir: Path, run_id: str, uri: str, steps: range, status: str) -> Path:
    """A spool as the earlier release wrote it: <run folder>/tracking-spool.json, one JSON
    document of the run's waiting operations."""
    ops: list[dict] = [
        {"kind": "metrics", "step": s, "time_ms": 1000 * s, "values": metrics_at(s)} for s in steps
    ]
    ops.append({"kind": "terminate", "status": status})
    path = run_dir / f"{SPOOL_DIR}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri, "ops": ops}))
    return path


def _mlflow_run(server: MlflowServer) -> tuple[MlflowClient, str]:
    client = MlflowClient(server.url)
    experiment = client.create_experiment(f"legacy-{uuid.uuid4().hex[:8]}")
    return client, client.create_run(experiment).info.run_id


def test_hyla_sync_converts_and_sends_a_spool_of_the_earlier_format(server, tmp_path, capsys):
    """`hyla sync` finds the earlier release's spool in the run folder: converted once (with
    a warning naming both files), then sent, its end included; nothing is left."""
    client, run_id = _mlflow_run(server)
    run_dir = tmp_path / "store" / "spooled"
    _legacy_spool(run_dir, run_id, server.url, range(1, 4), "FAILED")
    assert main(["sync", "spooled", "--storage", str(tmp_path / "store")]) == 0
    assert "run spooled: 4 tracking operations sent" in capsys.readouterr().out
    assert loss_steps(client, run_id) == [1, 2, 3]
    assert client.get_run(run_id).info.status == "FAILED"
    assert not spool_files(run_dir)


def test_a_session_adopts_a_spool_of_the_earlier_format(server, tmp_path, caplog):
    """The next session of a run whose earlier-release spool waits (steps 1-2, and the end
    KILLED of that session): it converts it, sends its points but not its end (the run is
    RUNNING while it trains), and goes on."""
    client, run_id = _mlflow_run(server)
    run_dir = tmp_path / "run"
    legacy = _legacy_spool(run_dir, run_id, server.url, range(1, 3), "KILLED")
    tracker = Tracker(spool_cfg(server), str(run_dir), rank=0)
    with caplog.at_level("WARNING", logger="hyla.platform.outbox"):
        tracker.start(run_id, {}, "")
    assert f"{legacy} of an earlier hyla version is now" in caplog.text
    wait_for(lambda: not spool_files(run_dir))
    assert loss_steps(client, run_id) == [1, 2]
    assert client.get_run(run_id).info.status == "RUNNING"
    tracker.log_metrics(metrics_at(3), 3)
    tracker.finish()
    assert loss_steps(client, run_id) == [1, 2, 3]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_torn_spool_of_the_earlier_format_is_refused_naming_it(server, tmp_path, capsys):
    """An earlier-release spool cut short by a crash mid-rewrite cannot be split into its
    records: `hyla sync` and a session of the run refuse it in one line naming the file and
    what to do, leave it as it was, and start no MLflow run."""
    client, run_id = _mlflow_run(server)
    run_dir = tmp_path / "store" / "spooled"
    legacy = _legacy_spool(run_dir, run_id, server.url, range(1, 4), "FAILED")
    legacy.write_bytes(torn := legacy.read_bytes()[:-40])
    message = (
        rf"the tracking spool {legacy}, of an earlier hyla version, does not parse "
        r"\(JSONDecodeError: .*\): .* move it out of the run folder \(or delete it\)"
    )
    assert main(["sync", "spooled", "--storage", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(rf"hyla: error: {message}.*\n", err), err
    tracker = Tracker(spool_cfg(server), str(run_dir), rank=0)
    with pytest.raises(ValueError, match=message):
        tracker.start(None, {}, "")
    assert legacy.read_bytes() == torn
    assert [p.name for p in spool_files(run_dir)] == [legacy.name]
    assert client.get_experiment_by_name("spool") is None  # the session's: never made
