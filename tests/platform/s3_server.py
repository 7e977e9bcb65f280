"""A real moto S3 server on 127.0.0.1 for tests: `with moto_s3() as endpoint: ...`.

It runs in a thread of the test process (moto's ThreadedMotoServer) on a free port, so any
process can reach it over HTTP, and it is stopped through its handle on exit. Clients need
dummy credentials (S3_ENV) and the endpoint, either through storage_options
{"client_kwargs": {"endpoint_url": endpoint}} or the AWS_ENDPOINT_URL environment variable.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def moto_s3() -> Iterator[str]:
    """Start moto's S3 on a free loopback port; yield its endpoint URL; stop it on exit."""
    from moto.server import ThreadedMotoServer  # heavy: only when a server is wanted

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@contextmanager
def moto_s3_environment(monkeypatch) -> Iterator[str]:
    """moto_s3, with the environment pointing every s3 client at it (dummy credentials and
    AWS_ENDPOINT_URL, which processes started meanwhile inherit). s3fs caches its filesystems
    by constructor arguments, not by environment: those built for an earlier server are
    dropped on entry and on exit."""
    import s3fs

    with moto_s3() as endpoint:
        for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            yield endpoint
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
