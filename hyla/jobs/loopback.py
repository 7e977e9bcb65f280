"""Ray Train's torch process group, rendezvous on loopback: for the embedded Ray only.

Ray Train rendezvouses its workers through a TCPStore whose server listens on every
interface. For a job that never leaves this machine, rank 0 binds the store's socket to
127.0.0.1 itself and hands it over (`master_listen_fd`); gloo's own sockets stay on loopback
through GLOO_SOCKET_IFNAME (see hyla.jobs.embedded.LOOPBACK_ENV).
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

_LISTENER: socket.socket | None = None  # rank 0's store socket, alive as long as the store


def _listen() -> int:
    """On rank 0: a socket listening on 127.0.0.1; its port."""
    global _LISTENER
    _LISTENER = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    _LISTENER.bind(("127.0.0.1", 0))
    _LISTENER.listen(128)
    return _LISTENER.getsockname()[1]


def _join(backend: str, world_rank: int, world: int, port: int, timeout_s: int) -> None:
    timeout = timedelta(seconds=timeout_s)
    rank = world_rank
    fd = None
    if rank == 0:
        assert _LISTENER is not None  # _listen ran on this worker first
        fd = _LISTENER.fileno()
    store = dist.TCPStore("127.0.0.1", port, world, rank == 0, timeout=timeout, master_listen_fd=fd)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


class _LoopbackTorchBackend(_TorchBackend):
    # Ray pairs each backend with its own config class (backend_cls), as _TorchBackend does
    def on_start(self, worker_group, backend_config: TorchConfig) -> None:  # type: ignore[override]
        import ray

        port = worker_group.execute_single(0, _listen)
        world = len(worker_group)
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    _join,
                    backend=backend_config.backend or "gloo",
                    world_rank=rank,
                    world=world,
                    port=port,
                    timeout_s=backend_config.timeout_s,
                )
                for rank in range(world)
            ]
        )


class LoopbackTorchConfig(TorchConfig):
    """TorchConfig whose process group meets on 127.0.0.1."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend
