"""The embedded Ray of `hyla train` without an address: a local instance of its own, every
process of it on loopback; or a connection to the cluster that was named."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from hyla.platform.config import JobConfig

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
