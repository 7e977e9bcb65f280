"""`hyla submit | status | logs | stop`: training jobs on a Ray cluster, through the Jobs API
that the head's dashboard serves (http://HEAD:8265).

`submit` validates the overrides here, then runs `python -m hyla.jobs.cli train <overrides>` on
the cluster with this hyla package shipped in the job's runtime_env (py_modules), configs
included, so the cluster needs Ray and hyla's dependencies but not hyla itself.

Token auth: with RAY_AUTH_MODE=token the token (RAY_AUTH_TOKEN, else the file named by
RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token) is sent as a bearer header. hyla reads it itself
at each call: Ray's own client reads RAY_AUTH_MODE once, when ray is first imported, and sends
nothing when the mode is unset.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from ray.job_submission import JobStatus, JobSubmissionClient

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 30.0
# what the job needs from the submitting shell; credentials stay on the client
PASSTHROUGH_ENV = ("MLFLOW_TRACKING_URI", "HYLA_KERNEL_BACKEND")
# the shipped package is hyla/ itself: caches are not part of it
SHIP_EXCLUDES = ["__pycache__", "*.pyc"]


def resolve_address(address: str | None = None) -> str:
    """The Jobs API address: `address`, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else
    http://127.0.0.1:8265. It must be the dashboard's http(s):// URL."""
    source = "--address"
    if address is None:
        for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            if os.environ.get(name):
                source, address = name, os.environ[name]
                break
        else:
            return DEFAULT_ADDRESS
    parts = urlsplit(address)
    if parts.scheme in ("http", "https") and parts.hostname and parts.path in ("", "/"):
        return address.rstrip("/")
    if parts.scheme in ("http", "https"):
        kind = "not a base URL http(s)://HOST[:PORT]"
    elif parts.scheme == "ray":
        kind = "a Ray Client address (ray://)"
    elif "://" not in address:
        kind = "a cluster (GCS) address, which `hyla train` and ray.init use"
    else:
        kind = "not an http(s):// address"
    raise ValueError(
        f"{source}={address!r} is {kind}; hyla submit/status/logs/stop need the Jobs API of "
        f"the head's dashboard: pass --address http://HEAD:8265 (the dashboard port, 8265 "
        f"unless the head was started with another --dashboard-port)"
    )


def _auth_token() -> str | None:
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token:
        return token.strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def auth_headers() -> dict[str, str]:
    """The bearer header when RAY_AUTH_MODE=token; nothing otherwise."""
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if mode != "token":
        return {}
    token = _auth_token()
    if token is None:
        raise ValueError(
            "RAY_AUTH_MODE=token but no token was found: set RAY_AUTH_TOKEN, or "
            "RAY_AUTH_TOKEN_PATH to a file holding it, or write it to ~/.ray/auth_token"
        )
    return {"Authorization": f"Bearer {token}"}


def _check_jobs_api(address: str, headers: dict[str, str]) -> None:
    """Fail in seconds, naming the address, where Ray's client (no timeouts) could hang: no
    connection, or a server that does not answer as a Ray dashboard. Auth errors are left to
    Ray's client, which reports them as such."""
    import requests

    parts = urlsplit(address)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ConnectionError(
            f"cannot reach the Ray Jobs API at {address} ({e.strerror or e}); is a Ray head "
            f"running there with its dashboard?"
        ) from e
    try:
        r = requests.get(
            f"{address}/api/version", headers=headers, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
        )
        if r.status_code in (401, 403):
            return
        answered, detail = r.ok and "ray_version" in r.json(), f"HTTP {r.status_code}"
    except (requests.RequestException, ValueError, TypeError) as e:  # not HTTP, not JSON
        answered, detail = False, type(e).__name__
    if not answered:
        raise ConnectionError(
            f"{address} accepts connections but does not answer as a Ray dashboard's Jobs API "
            f"({detail}); is it the head's dashboard port (8265 by default)?"
        )


@contextmanager
def _env_var(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def connect(address: str | None = None) -> JobSubmissionClient:
    """A Jobs API client for `address` (see resolve_address), with token auth if configured."""
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    headers = auth_headers()
    _check_jobs_api(address, headers)
    # Ray's client replaces its address argument by RAY_API_SERVER_ADDRESS or RAY_ADDRESS
    # when either is set: pin it to the address resolved here.
    with _env_var("RAY_API_SERVER_ADDRESS", address):
        return JobSubmissionClient(address, headers=headers)


def runtime_env() -> dict:
    """Ships this hyla package (an editable checkout or an installed wheel alike) and the
    environment variables the job reads."""
    import hyla

    env_vars = {name: os.environ[name] for name in PASSTHROUGH_ENV if os.environ.get(name)}
    package = str(Path(hyla.__file__).resolve().parent)
    return {"py_modules": [package], "excludes": SHIP_EXCLUDES, "env_vars": env_vars}


def train_entrypoint(overrides: list[str]) -> list[str]:
    return ["python", "-m", "hyla.jobs.cli", "train", *overrides]


def submit_job(
    address: str | None, entrypoint: list[str], *, submission_id: str | None = None
) -> str:
    """Submit the command `entrypoint` (an argv list, run by a shell on the head) with hyla
    shipped (see runtime_env); returns the job's submission id."""
    if not entrypoint:
        raise ValueError(f"entrypoint must be a non-empty command list, got {entrypoint!r}")
    client = connect(address)
    return client.submit_job(
        entrypoint=shlex.join(entrypoint), runtime_env=runtime_env(), submission_id=submission_id
    )


def follow_logs(client: JobSubmissionClient, job_id: str) -> JobStatus:
    """Print the job's logs as they come until it ends; returns its final status."""
    import aiohttp

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    client.get_job_status(job_id)  # an unknown job: Ray's clear error, not a websocket 404
    try:
        asyncio.run(tail())
    except aiohttp.ClientError as e:
        raise ConnectionError(
            f"lost the log stream of job {job_id} from {client.get_address()}: {e}"
        ) from e
    # the log stream closes when the job ends; its status may lag by a moment
    return _wait_terminal(client, job_id, timeout=10.0)


def _wait_terminal(client: JobSubmissionClient, job_id: str, timeout: float) -> JobStatus:
    deadline = time.monotonic() + timeout
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.2)
        status = client.get_job_status(job_id)
    return status


def _finished(job_id: str, status: JobStatus) -> int:
    print(f"job {job_id} finished: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _time(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else ""


def print_jobs(client: JobSubmissionClient) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Ray jobs at {client.get_address()}")
    table.add_column("job", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("started", no_wrap=True)
    table.add_column("ended", no_wrap=True)
    table.add_column("entrypoint", overflow="fold")
    jobs = [job for job in client.list_jobs() if job.submission_id]
    for job in sorted(jobs, key=lambda job: job.start_time or 0):
        table.add_row(
            job.submission_id,
            str(job.status),
            _time(job.start_time),
            _time(job.end_time),
            job.entrypoint,
        )
    Console(width=max(Console().width, 120)).print(table)


# ---- commands: each returns the exit code ----


def _submit(args: argparse.Namespace) -> int:
    from hyla.platform.config import compose

    compose(args.overrides)  # a bad override fails here, before anything reaches the cluster
    address = resolve_address(args.address)
    job_id = submit_job(address, train_entrypoint(args.overrides), submission_id=args.name)
    print(f"submitted job {job_id} to {address}")
    for command in ("status", "logs --follow", "stop"):
        print(f"  hyla {command} {job_id} --address {address}")
    if args.no_wait:
        return 0
    client = connect(address)
    try:
        return _finished(job_id, follow_logs(client, job_id))
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running", file=sys.stderr)
        return 130


def _status(args: argparse.Namespace) -> int:
    client = connect(args.address)
    if args.job is None:
        print_jobs(client)
    else:
        info = client.get_job_info(args.job)
        print(f"{args.job}: {info.status}" + (f" ({info.message})" if info.message else ""))
    return 0


def _logs(args: argparse.Namespace) -> int:
    client = connect(args.address)
    if args.follow:
        return _finished(args.job, follow_logs(client, args.job))
    sys.stdout.write(client.get_job_logs(args.job))
    return 0


def _stop(args: argparse.Namespace) -> int:
    client = connect(args.address)
    was_running = client.stop_job(args.job)
    status = _wait_terminal(client, args.job, timeout=STOP_TIMEOUT_S)
    print(f"{args.job}: {status}" + ("" if was_running else " (it was not running)"))
    return 0 if status.is_terminal() else 1


def _reported(name: str, command: Callable[[argparse.Namespace], int]) -> Callable:
    """Failures of the cluster (an unreachable or refusing head, an unknown job) end the command
    with one clear line and exit code 1 instead of a traceback; bad input is left to `hyla`'s
    own error line (exit code 2)."""

    def run(args: argparse.Namespace) -> int:
        from ray.exceptions import AuthenticationError  # here: `hyla` alone need not import ray

        try:
            return command(args)
        except AuthenticationError as e:
            print(
                f"hyla {name}: the Ray head refused the request: {e.message}. The head uses "
                f"token auth: set RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN (or "
                f"RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token)",
                file=sys.stderr,
            )
        except (ConnectionError, RuntimeError) as e:  # the cluster's state, not the input
            print(f"hyla {name}: {e}", file=sys.stderr)
        return 1

    return run


def add_commands(commands: argparse._SubParsersAction) -> None:
    address = argparse.ArgumentParser(add_help=False)
    address.add_argument(
        "--address",
        help="the Ray head's Jobs API, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS or "
        f"RAY_ADDRESS when it is an http(s):// address, else {DEFAULT_ADDRESS})",
    )

    about = "run `hyla train OVERRIDES` as a job on a Ray cluster, with this hyla shipped"
    submit = commands.add_parser("submit", parents=[address], help=about, description=about)
    submit.add_argument("overrides", nargs="*", help="config overrides, as for `hyla train`")
    submit.add_argument("--name", help="the job's submission id (unique on the cluster)")
    submit.add_argument(
        "--no-wait", action="store_true", help="return once submitted (default: follow the logs)"
    )
    submit.set_defaults(func=_reported("submit", _submit))

    status = commands.add_parser("status", parents=[address], help="a job's status, or all jobs")
    status.add_argument("job", nargs="?", help="the job's submission id (default: list all)")
    status.set_defaults(func=_reported("status", _status))

    logs = commands.add_parser("logs", parents=[address], help="print a job's logs")
    logs.add_argument("job", help="the job's submission id")
    logs.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    logs.set_defaults(func=_reported("logs", _logs))

    stop = commands.add_parser("stop", parents=[address], help="stop a job")
    stop.add_argument("job", help="the job's submission id")
    stop.set_defaults(func=_reported("stop", _stop))
