"""A real local Ray head (GCS, raylet, dashboard with the Jobs API) for tests, bound to
127.0.0.1 on free ports, with token auth on by default.

    with ray_head(num_cpus=2) as head:
        JobSubmissionClient(head.address, headers=head.auth_headers)   # Jobs API
        env = {**os.environ, **head.client_env, "RAY_ADDRESS": head.gcs_address}  # ray.init

It runs `ray start --head --block` in a new session with its own temp dir, so nothing of it is
shared with another Ray instance on the machine (not /tmp/ray, not its default ports), and it
is stopped through the pids it started: never `ray stop`, which kills every Ray process on the
machine. Teardown checks that none of those processes is left.

The dashboard (Jobs API) listens on 127.0.0.1 only. Ray binds its gRPC servers (GCS, raylet)
to every interface whatever the node address, and turns 127.0.0.1 into the machine's IP: the
token is what guards those.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

HOST = "127.0.0.1"


def free_ports(n: int) -> list[int]:
    """n distinct ports that were free a moment ago (all bound at once, then released)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]


@dataclass
class RayHead:
    address: str  # the dashboard / Jobs API, http://127.0.0.1:PORT
    gcs_address: str  # for ray.init(address=...) or RAY_ADDRESS, 127.0.0.1:PORT
    temp_dir: Path  # the head's --temp-dir (sessions, logs)
    client_env: dict[str, str]  # what a client needs in its environment (token auth)
    process: subprocess.Popen

    @property
    def auth_headers(self) -> dict[str, str]:
        token = self.client_env.get("RAY_AUTH_TOKEN")
        return {"Authorization": f"Bearer {token}"} if token else {}

    def processes(self) -> list[psutil.Process]:
        """This head's processes now: `ray start` and its descendants (job drivers too,
        although Ray starts those in sessions of their own)."""
        try:
            leader = psutil.Process(self.process.pid)
            return [leader, *leader.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def log_tail(self, chars: int = 4000) -> str:
        return (self.temp_dir / "ray-start.log").read_text(errors="replace")[-chars:]


def _wait_ready(head: RayHead, timeout: float) -> None:
    """Until the Jobs API answers (the dashboard starts last), or raise with the head's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.process.poll() is not None:
            raise RuntimeError(
                f"ray start exited with {head.process.returncode}:\n{head.log_tail()}"
            )
        try:
            r = requests.get(f"{head.address}/api/jobs/", headers=head.auth_headers, timeout=2)
            if r.status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the Ray head's Jobs API at {head.address} did not answer in {timeout} s")


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running; a zombie has exited (only its parent has not reaped it yet)."""
    out = []
    for p in processes:
        with suppress(psutil.NoSuchProcess):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def _wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while (left := alive(processes)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def stop_head(head: RayHead, grace: float = 15.0) -> None:
    """SIGTERM `ray start`, which stops its processes in order (raylet first, then the GCS,
    then the rest); SIGKILL whatever of them is left after `grace` seconds, and raise if any
    still lives."""
    procs = head.processes()
    head.process.terminate()
    for p in _wait_gone(procs, grace):
        with suppress(psutil.NoSuchProcess):
            p.kill()
    left = _wait_gone(procs, 5.0)
    head.process.wait(timeout=5)
    if left:
        raise RuntimeError(f"Ray head processes still alive after SIGKILL: {left}")


@contextmanager
def ray_head(
    num_cpus: int = 2,
    token_auth: bool = True,
    start_timeout: float = 90.0,
    temp_dir: Path | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[RayHead]:
    """Start a Ray head on 127.0.0.1 and yield it; stop exactly what was started on exit.

    token_auth: the head requires RAY_AUTH_MODE=token with a fresh random token (given to
    clients in `client_env` and `auth_headers`; ~/.ray/auth_token is neither read nor written).
    Without it the head runs with auth disabled.
    temp_dir: its --temp-dir (deleted on exit); a new folder under /tmp by default.
    extra_env: more environment for `ray start` (RAY_TMPDIR=BASE with temp_dir BASE/ray puts
    the head where a bare ray.init() with the same RAY_TMPDIR looks for a running cluster).
    """
    # short: Ray's unix socket paths under it must stay within 107 characters
    if temp_dir is None:
        temp_dir = Path(tempfile.mkdtemp(prefix="hyla-ray-", dir="/tmp"))
    temp_dir.mkdir(parents=True, exist_ok=True)
    gcs, dashboard, client_server, agent = free_ports(4)
    if token_auth:
        client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    else:
        client_env = {"RAY_AUTH_MODE": "disabled"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # no drain wait on SIGTERM (meant for Serve replicas on Kubernetes): stop at once
    env.update(client_env, RAY_USAGE_STATS_ENABLED="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    env.update(extra_env or {})
    # job entrypoints run `python`: the interpreter of this venv, as on an activated cluster node
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    command = [
        str(Path(bin_dir) / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        "--include-dashboard=true",
        f"--dashboard-host={HOST}",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client_server}",
        f"--dashboard-agent-listen-port={agent}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    with open(temp_dir / "ray-start.log", "wb") as log:
        process = subprocess.Popen(
            command,
            env=env,
            cwd=temp_dir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    head = RayHead(
        address=f"http://{HOST}:{dashboard}",
        gcs_address=f"{HOST}:{gcs}",
        temp_dir=temp_dir,
        client_env=client_env,
        process=process,
    )
    try:
        _wait_ready(head, start_timeout)
        yield head
    finally:
        try:
            stop_head(head)
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)
