"""A real `mlflow server` on 127.0.0.1 for tests: `with mlflow_server(folder) as url: ...`;
its helpers start, wait for and stop any local server (`mlflow models serve` too).

The server's SQLite store, artifacts and log live in `folder`. It runs in a process group of
its own (it spawns uvicorn workers), which is killed on exit: nothing else is touched.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.request import urlopen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_answering(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Return once GET `url` answers 200. Raise with the server's log if `proc` (the server)
    exits first, or after `timeout` s: a ceiling against a server that hangs, not a wait."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s:\n{log.read_text()}")


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group `proc` leads (started with start_new_session=True), SIGKILL
    it if it lingers or leaves children."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    with suppress(ProcessLookupError):  # uvicorn children outliving the server
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class MlflowServer:
    """`mlflow server --workers 1` on one loopback port, which it keeps across a stop and a
    start (the same store: a restarted server)."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> None:
        """Start it; return once /health answers."""
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.folder.resolve() / 'mlflow.db'}",
            "--artifacts-destination", str(self.folder.resolve() / "artifacts"),
        ]  # fmt: skip
        log = self.folder / "server.log"
        with log.open("ab") as out:
            self._proc = subprocess.Popen(
                command, cwd=self.folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        wait_answering(f"{self.url}/health", self._proc, log, timeout)

    def stop(self) -> None:
        if self._proc is not None:
            stop_group(self._proc)
            self._proc = None


@contextmanager
def mlflow_server(folder: Path, timeout: float = 90.0) -> Iterator[str]:
    """Start `mlflow server --workers 1` on a free loopback port; yield its URL once /health
    answers; stop it on exit."""
    server = MlflowServer(folder)
    try:
        server.start(timeout)
        yield server.url
    finally:
        server.stop()
