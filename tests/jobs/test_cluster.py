"""`hyla submit | status | logs | stop` against a real local Ray head with token auth."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
import uuid

import pytest

# Ray's own client reads RAY_AUTH_MODE once, when ray is imported: import it here, before the
# head fixture puts the token in the environment, so that only hyla's headers carry it.
import ray.job_submission  # noqa: F401

from hyla.jobs.cli import main
from hyla.jobs.cluster import DEFAULT_ADDRESS, connect, resolve_address, submit_job
from tests.jobs.ray_head import alive, free_ports, ray_head

ADDRESS_VARS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@pytest.fixture(scope="module")
def head():
    """One head for the module; the client environment holds its token. Teardown proves that
    every process the head started is gone."""
    with ray_head(num_cpus=2) as h, pytest.MonkeyPatch.context() as env:
        for name in ADDRESS_VARS + AUTH_VARS:
            env.delenv(name, raising=False)
        for name, value in h.client_env.items():
            env.setenv(name, value)
        yield h
        started = h.processes()
    assert len(started) > 5  # ray start, gcs, raylet, dashboard, ...
    assert not alive(started)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def wait_for_status(head, job_id: str, wanted: str, timeout: float = 60.0) -> None:
    client = connect(head.address)
    deadline = time.monotonic() + timeout
    while (status := client.get_job_status(job_id)) != wanted:
        assert not status.is_terminal() and time.monotonic() < deadline, status
        time.sleep(0.3)


def test_job_runs_the_shipped_hyla_and_the_commands_follow_it(head, capsys, monkeypatch):
    # the first command proves which hyla the job imports: the copy shipped in py_modules
    # (under the head's runtime_resources), not this checkout, which the head could import too
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    where = (
        "import os, hyla.jobs.cli as m; print('HYLA_FROM', m.__file__); "
        "print('MLFLOW_URI', os.environ['MLFLOW_TRACKING_URI'])"
    )
    job = submit_job(
        head.address,
        ["sh", "-c", f'python -c "{where}" && python -m hyla.jobs.cli params tiny'],
    )
    code, out, _ = run(capsys, "logs", job, "--follow", "--address", head.address)
    assert code == 0
    shipped = re.search(r"^HYLA_FROM (\S+)$", out, re.MULTILINE).group(1)
    assert shipped.startswith(str(head.temp_dir)) and "py_modules_files" in shipped
    assert "MLFLOW_URI http://mlflow.example:5000" in out
    assert "LGDMA" in out and "326,096" in out  # params read configs/model/tiny.yaml

    code, out, _ = run(capsys, "logs", job, "--address", head.address)
    assert code == 0 and "LGDMA" in out and "326,096" in out
    code, out, _ = run(capsys, "status", job, "--address", head.address)
    assert code == 0 and f"{job}: SUCCEEDED" in out
    code, out, _ = run(capsys, "status", "--address", head.address)
    row = next(line for line in out.splitlines() if job in line)
    assert code == 0 and "SUCCEEDED" in row


def test_stop_ends_a_running_job(head, capsys):
    job = submit_job(head.address, ["python", "-c", "import time; time.sleep(600)"])
    wait_for_status(head, job, "RUNNING")
    assert any("time.sleep(600)" in " ".join(p.cmdline()) for p in head.processes())
    code, out, _ = run(capsys, "stop", job, "--address", head.address)
    assert code == 0 and f"{job}: STOPPED" in out
    assert connect(head.address).get_job_status(job) == "STOPPED"
    time.sleep(1)  # Ray signals the driver's process group; give it a moment to go
    assert not any("time.sleep(600)" in " ".join(p.cmdline()) for p in head.processes())


def test_submit_trains_on_the_cluster_and_follows_the_job(head, capsys, tmp_path):
    name = f"hyla-test-{uuid.uuid4().hex[:8]}"
    overrides = [
        "parallel=none",
        "trainer.steps=2",
        "trainer.eval_every=2",
        "trainer.eval_batches=1",
        "optim.warmup_steps=1",
        "data.seq_len=64",
        "data.batch_size=2",
        "data.max_documents=20",
        f"checkpoint.dir={tmp_path}/store",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"tracking.run_name={name}",
    ]
    code, out, err = run(capsys, "submit", *overrides, "--name", name, "--address", head.address)
    assert code == 0 and f"submitted job {name} to {head.address}" in out
    for command in ("status", "logs --follow", "stop"):
        assert f"hyla {command} {name} --address {head.address}" in out
    assert "final loss" in out and f"job {name} finished: SUCCEEDED" in err
    info = connect(head.address).get_job_info(name)
    assert info.entrypoint == shlex.join(["python", "-m", "hyla.jobs.cli", "train", *overrides])
    assert (tmp_path / "store" / name / "checkpoints").is_dir()  # the head is this machine
    code, _, err = run(capsys, "submit", "--name", name, "--no-wait", "--address", head.address)
    assert code == 1 and name in err  # submission ids are unique on a cluster


def test_bad_override_fails_before_anything_is_submitted(head, capsys):
    before = {job.submission_id for job in connect(head.address).list_jobs()}
    for override, message in (
        ("model=nope", "model must be one of"),
        ("trainer.steps=0", "trainer.steps must be an integer >= 1"),
        ("trainer.nope=1", "trainer.nope"),
    ):
        code, out, err = run(capsys, "submit", override, "--address", head.address)
        assert code == 2 and "hyla: error: " in err and message in err and "submitted" not in out
    assert {job.submission_id for job in connect(head.address).list_jobs()} == before


def test_unknown_job_is_a_clear_error(head, capsys):
    for command in (["status"], ["logs"], ["logs", "--follow"], ["stop"]):
        code, _, err = run(capsys, *command, "raysubmit_nope", "--address", head.address)
        assert code == 1 and "raysubmit_nope" in err, (command, err)


def test_unreachable_address_fails_within_seconds(capsys):
    (port,) = free_ports(1)  # nothing listens there
    address = f"http://127.0.0.1:{port}"
    submit = ["submit", "trainer.steps=2", "optim.warmup_steps=1"]
    for argv in (["status"], ["logs", "some-job"], submit):
        start = time.monotonic()
        code, _, err = run(capsys, *argv, "--address", address)
        assert code == 1 and f"cannot reach the Ray Jobs API at {address}" in err
        assert time.monotonic() - start < 10


def test_an_address_that_is_not_the_jobs_api_is_named(head, capsys):
    address = f"http://{head.gcs_address}"  # the GCS gRPC port: listens, but is no dashboard
    code, _, err = run(capsys, "status", "--address", address)
    assert code == 1 and address in err and "does not answer as a Ray dashboard" in err


def test_token_auth(head, capsys, monkeypatch, tmp_path):
    token = head.client_env["RAY_AUTH_TOKEN"]
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token to fall back on

    # no auth settings at all: in a process of its own, since without hyla's header Ray's
    # client would fall back on its own token state, which an earlier ray.init() in this
    # process may have set (and which this must not disturb either)
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    cli = [sys.executable, "-m", "hyla.jobs.cli", "status", "--address", head.address]
    done = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=120)
    out, err = done.stdout, done.stderr
    assert done.returncode == 1 and "refused" in err and "RAY_AUTH_MODE=token" in err

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    code, out2, err2 = run(capsys, "status", "--address", head.address)
    assert code == 1 and "refused" in err2 and "not-the-token" not in out2 + err2

    monkeypatch.delenv("RAY_AUTH_TOKEN")
    code, _, err3 = run(capsys, "status", "--address", head.address)
    assert code == 2 and "hyla: error: RAY_AUTH_MODE=token but no token was found" in err3

    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(token + "\n")
    code, out4, err4 = run(capsys, "status", "--address", head.address)
    assert code == 0 and "Ray jobs at" in out4

    (tmp_path / ".ray" / "auth_token").unlink()
    (tmp_path / "token").write_text(token)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    code, out5, err5 = run(capsys, "status", "--address", head.address)
    assert code == 0 and "Ray jobs at" in out5
    assert token not in out + err + out4 + err4 + out5 + err5


def test_address_comes_from_the_flag_then_the_environment(head, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", head.address)
    assert run(capsys, "status")[0] == 0
    # --address wins over RAY_ADDRESS, also inside Ray's client, which would prefer the variable
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    assert run(capsys, "status", "--address", head.address)[0] == 0


def test_resolve_address(monkeypatch):
    for name in ADDRESS_VARS:
        monkeypatch.delenv(name, raising=False)
    assert resolve_address() == DEFAULT_ADDRESS
    assert resolve_address("https://head.example:8265/") == "https://head.example:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert resolve_address() == "http://head:8265"
    assert resolve_address("http://other:8265") == "http://other:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://api:8265")
    assert resolve_address() == "http://api:8265"
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    for value, kind in (
        ("ray://head:10001", "Ray Client address"),
        ("head:6379", "cluster (GCS) address"),
        ("auto", "cluster (GCS) address"),
        ("grpc://head:1", "not an http(s)"),
    ):
        monkeypatch.setenv("RAY_ADDRESS", value)
        with pytest.raises(ValueError, match=r"RAY_ADDRESS=.*--address http://HEAD:8265") as e:
            resolve_address()
        assert value in str(e.value) and kind in str(e.value)
    with pytest.raises(ValueError, match=r"--address='http://head:8265/api' is not a base URL"):
        resolve_address("http://head:8265/api")
