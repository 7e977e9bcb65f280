"""Planning a continued run (hyla.jobs.elastic) reads the global batch from the newest
checkpoint that verifies, on local disk and on s3 (moto): never from a damaged one."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import fsspec
import pytest

from hyla.jobs.elastic import keep_global_batch
from hyla.platform.checkpoint import (
    CheckpointStore,
    CheckpointWarning,
    NoLoadableCheckpointError,
)
from hyla.platform.config import JobConfig, compose
from hyla.platform.paths import run_storage
from tests.platform.s3_server import moto_s3_environment


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path, monkeypatch) -> Iterator[str]:
    """A checkpoint.dir: a local folder, or a prefix of a bucket of a moto server (whose
    buckets outlive it: moto keeps them in the process)."""
    if request.param == "local":
        yield str(tmp_path / "store")
        return
    with moto_s3_environment(monkeypatch):
        fsspec.filesystem("s3").makedirs("hyla-plan", exist_ok=True)
        yield f"s3://hyla-plan/{uuid.uuid4().hex[:8]}"


def _run_with_two_checkpoints(storage: str) -> tuple[JobConfig, CheckpointStore]:
    """A run (global batch 1 x 2 x 1 = 2) with checkpoints of steps 1 and 2 recording it."""
    cfg = compose(
        [
            "parallel=none",
            "data.batch_size=2",
            f"checkpoint.dir={storage}",
            "tracking.run_name=plan",
        ]
    )
    assert cfg.global_batch == 2
    store = CheckpointStore(run_storage(cfg), cfg.checkpoint.keep_last)
    position = {"consumed": 0, "global_batch": 2, "dp": 1, "sp": 1, "batch_size": 2}
    for step in (1, 2):
        store.save(step, {}, {"step": step, "data": {**position, "grad_accum": 1}}, {})
    return cfg, store


def test_planning_skips_a_newest_checkpoint_that_does_not_verify(storage):
    """A same-size edit of the newest shared.json ("global_batch": 2 -> 9) used to re-plan
    the run for a global batch of 9; it fails its hash, so the plan keeps 2."""
    cfg, store = _run_with_two_checkpoints(storage)
    shared = f"{store.url_of(2)}/shared.json"
    with fsspec.open(shared, "rb") as f:
        data = f.read()
    assert data.count(b'"global_batch": 2') == 1
    with fsspec.open(shared, "wb") as f:
        f.write(data.replace(b'"global_batch": 2', b'"global_batch": 9'))
    with pytest.warns(CheckpointWarning, match=r"step-00000002 is corrupt: shared\.json"):
        assert keep_global_batch(cfg) == cfg


def test_planning_a_run_whose_checkpoints_all_fail_is_one_error(storage):
    cfg, store = _run_with_two_checkpoints(storage)
    for step in (1, 2):
        with fsspec.open(f"{store.url_of(step)}/COMMITTED", "wb") as f:
            f.write(b"{")
    with (
        pytest.warns(CheckpointWarning),
        pytest.raises(NoLoadableCheckpointError, match=r"step-00000002 .*step-00000001"),
    ):
        keep_global_batch(cfg)
