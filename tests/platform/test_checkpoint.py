"""CheckpointStore on real storage: a local folder, memory://, s3:// through a moto server on
loopback, and 2 real gloo processes."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import fsspec
import pytest
import s3fs
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel

from hyla.platform.checkpoint import (
    CheckpointStore,
    CheckpointWarning,
    IncompleteCheckpointError,
    NoLoadableCheckpointError,
    StorageFullError,
    UnsafeCheckpointError,
    _full_storage,
)
from hyla.platform.data import DataConfig, build_dataset, build_loader
from hyla.platform.dcp_storage import _HashingStream
from hyla.platform.state_json import dumps_state, loads_state
from tests.parallel.launcher import run_distributed
from tests.platform.s3_server import S3_ENV, moto_s3
from tests.platform.small_disk import small_disk

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- helpers


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def _trained(seed: int, lr: float = 1e-2) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model and AdamW after one step, so the optimizer holds step, exp_avg, exp_avg_sq."""
    torch.manual_seed(seed)
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model(torch.randn(5, 8)).square().mean().backward()
    opt.step()
    return model, opt


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    model_sd, optim_sd = get_state_dict(model, opt)
    return {"model": model_sd, "optim": optim_sd}


def _restore(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    flat = [t.reshape(-1).view(torch.uint8) for t in (a, b)]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(*flat)


def _assert_same(model_a, opt_a, model_b, opt_b) -> None:
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(_same_bits(sd_a[k], sd_b[k]) for k in sd_a)
    osd_a, osd_b = opt_a.state_dict(), opt_b.state_dict()
    assert osd_a["param_groups"] == osd_b["param_groups"]
    assert osd_a["state"].keys() == osd_b["state"].keys()
    for i, entry in osd_a["state"].items():
        assert entry.keys() == osd_b["state"][i].keys()
        assert all(_same_bits(v, osd_b["state"][i][k]) for k, v in entry.items())


def _loader(num_workers: int = 0):
    cfg = DataConfig(
        source="mqar", seq_len=64, batch_size=2, mqar_samples=64, num_workers=num_workers
    )
    return build_loader(cfg, build_dataset(cfg, vocab_size=258), dp_rank=0, dp_size=1)


def _committed(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


@pytest.fixture(params=["local", "memory"])
def url(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "ckpt")
        return
    path = f"/hyla-test-{uuid.uuid4().hex}"
    yield f"memory://{path}"
    fs = fsspec.filesystem("memory")
    if fs.exists(path):
        fs.rm(path, recursive=True)


# ------------------------------------------------------------------------ round trips


def _round_trip(url: str, storage_options: dict | None = None) -> None:
    store = CheckpointStore(url, keep_last=2, storage_options=storage_options)
    model, opt = _trained(seed=0)
    loader = _loader()
    batches = iter(loader)
    for _ in range(3):
        next(batches)
    rng = torch.get_rng_state()
    shared = {"step": 3, "run_id": "abc123", "scheduler": {"last_epoch": 3, "_last_lr": [0.01]}}
    per_rank = {"loader": loader.state_dict(), "torch_rng": rng, "python_rng": random.getstate()}
    returned = store.save(3, _state(model, opt), shared, per_rank)
    assert returned == store.url_of(3)
    assert returned.endswith("/step-00000003")
    assert store.steps() == [3]
    assert store.latest() == 3

    fresh_model, fresh_opt = _trained(seed=1, lr=5e-3)  # other weights, moments and lr
    target = _state(fresh_model, fresh_opt)
    loaded_shared, loaded_rank = store.load(3, target)
    assert loaded_rank is not None
    _restore(fresh_model, fresh_opt, target)
    _assert_same(model, opt, fresh_model, fresh_opt)
    assert loaded_shared == shared
    assert _same_bits(loaded_rank["torch_rng"], rng)
    assert loaded_rank["python_rng"] == per_rank["python_rng"]
    assert loaded_rank["loader"] == per_rank["loader"]
    resumed = _loader()
    resumed.load_state_dict(loaded_rank["loader"])
    assert torch.equal(next(iter(resumed))["input_ids"], next(batches)["input_ids"])


def test_round_trip_is_bit_exact(url):
    _round_trip(url)


def test_codec_round_trips_exactly():
    tensors = [
        torch.tensor(True),
        torch.tensor([True, False]),
        torch.randn(3, 5).bfloat16(),
        torch.randn(2, dtype=torch.complex64),
        torch.tensor(-7),
        torch.empty(0, 3),
        torch.randn(4, 6).t(),  # not contiguous
        torch.tensor([math.nan, -0.0, math.inf]),
        torch.get_rng_state(),
    ]
    value = {
        "tensors": tensors,
        "tuple": (1, (2.5, None), []),
        "int keys": {0: "a", 1: {2: [3]}},
        "tuple key": {(1, "x"): True},
        "tag-like keys": {"__tensor__": 1, "__tuple__": [2], "__dict__": {}},
        "floats": [-0.0, math.inf, -math.inf, 1e-310, 0.1 + 0.2],
        "big int": 2**100,
        "python_rng": random.getstate(),
    }
    back = loads_state(dumps_state(value, "value"))
    assert all(_same_bits(a, b) for a, b in zip(back.pop("tensors"), tensors, strict=True))
    value.pop("tensors")
    assert back == value
    assert math.copysign(1.0, back["floats"][0]) == -1.0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_codec_keeps_loader_state(num_workers):
    loader = _loader(num_workers)
    batches = iter(loader)
    next(batches)
    state = loader.state_dict()
    assert loads_state(dumps_state(state, "per_rank")) == state


@pytest.mark.parametrize(
    ("bad", "where"),
    [({"a": {1, 2}}, "per_rank['a']"), ({"a": [object()]}, "per_rank['a'][0]")],
)
def test_codec_names_unsupported_values(bad, where):
    with pytest.raises(ValueError, match=re.escape(where) + " has type"):
        dumps_state(bad, "per_rank")


# ------------------------------------------------------------------------------ 2 ranks


def _two_ranks(rank: int, world: int, url: str) -> None:
    store = CheckpointStore(url, keep_last=2)
    torch.manual_seed(0)
    model = DistributedDataParallel(_net())  # the same initial weights on both ranks
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(100 + rank)  # each rank its own data and RNG stream
    model(torch.randn(5, 8)).square().mean().backward()
    opt.step()
    rng = torch.get_rng_state()
    store.save(7, _state(model, opt), {"step": 7}, {"rank": rank, "rng": rng})
    assert sorted(p.name for p in (Path(url) / "step-00000007").glob("rank-*.json")) == [
        "rank-00000.json",
        "rank-00001.json",
    ]

    torch.manual_seed(1)
    fresh = DistributedDataParallel(_net())
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=5e-3)
    target = _state(fresh, fresh_opt)
    latest = store.latest()
    assert latest is not None
    shared, mine = store.load(latest, target)
    assert mine is not None
    _restore(fresh, fresh_opt, target)
    _assert_same(model.module, opt, fresh.module, fresh_opt)
    assert shared == {"step": 7}
    assert mine["rank"] == rank
    assert _same_bits(mine["rng"], rng)

    # bad state on rank 1 only: every rank raises, none waits forever in a collective
    with pytest.raises(ValueError if rank == 1 else RuntimeError, match=r"per_rank\['bad'\]"):
        store.save(8, _state(model, opt), {}, {"bad": {1, 2}} if rank == 1 else {})
    assert store.steps() == [7]


def test_two_gloo_ranks_save_and_load(tmp_path):
    url = str(tmp_path / "ckpt")
    run_distributed(_two_ranks, 2, tmp_path, url)
    assert not list((tmp_path / "ckpt").glob("*.tmp-*"))
    # One process loads what two wrote (DCP reshards); per-rank state does not carry over.
    model, opt = _trained(seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = _state(model, opt)
    shared, mine = CheckpointStore(url, keep_last=2).load(7, target)
    _restore(model, opt, target)
    assert shared == {"step": 7} and mine is None
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------- keep_last, damage


def _save(store: CheckpointStore, step: int, model, opt) -> None:
    store.save(step, _state(model, opt), {"step": step}, {"step": step})


def test_keep_last_and_resaving_a_step(tmp_path):
    store = CheckpointStore(str(tmp_path), keep_last=2)
    model, opt = _trained(seed=0)
    for step in range(1, 6):
        _save(store, step, model, opt)
    assert store.steps() == [4, 5]
    assert _committed(tmp_path) == ["step-00000004", "step-00000005"]

    store.save(5, _state(model, opt), {"again": True}, {})  # a complete step is replaced
    assert store.steps() == [4, 5]
    assert store.load(5, _state(*_trained(seed=1)))[0] == {"again": True}


def test_a_save_stopped_between_its_renames_is_finished_at_the_next_start(tmp_path):
    """The states a re-save of step 5 passes through (old set aside, new not yet in place;
    both in place), made by renaming as the save does: the next start puts the old one
    back, or drops it for the new one; a set-aside copy that fails is quarantined."""
    store = CheckpointStore(str(tmp_path), keep_last=3)
    model, opt = _trained(seed=0)
    for step in (4, 5):
        _save(store, step, model, opt)
    (tmp_path / "step-00000005").rename(tmp_path / "step-00000005.replaced-0a1b")
    assert store.latest() == 4  # what a resume would take without restoring
    store.restore_set_aside()
    assert _committed(tmp_path) == ["step-00000004", "step-00000005"]
    assert store.latest() == 5

    shutil.copytree(tmp_path / "step-00000005", tmp_path / "step-00000005.replaced-0a1c")
    store.restore_set_aside()  # the new one is in place: the old one goes
    assert _committed(tmp_path) == ["step-00000004", "step-00000005"]

    (tmp_path / "step-00000004").rename(tmp_path / "step-00000004.replaced-0a1d")
    shard = next((tmp_path / "step-00000004.replaced-0a1d" / "dcp").glob("*.distcp"))
    shard.write_bytes(b"\0" * shard.stat().st_size)
    with pytest.warns(CheckpointWarning, match=r"step-00000004\.replaced-0a1d.*moved it to"):
        store.restore_set_aside()
    assert _committed(tmp_path) == ["quarantine", "step-00000005"]
    assert (tmp_path / "quarantine" / "step-00000004" / "QUARANTINED").exists()


def test_partial_and_corrupt_checkpoints_are_skipped(tmp_path):
    store = CheckpointStore(str(tmp_path), keep_last=10)
    model, opt = _trained(seed=0)
    for step in range(1, 6):
        _save(store, step, model, opt)
    (tmp_path / "step-00000005" / "COMMITTED").write_text("{not json")
    (tmp_path / "step-00000004" / "COMMITTED").unlink()  # a rename without its marker
    data = next((tmp_path / "step-00000003" / "dcp").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:-10])  # truncated
    (tmp_path / "step-00000002" / "rank-00000.json").unlink()
    (tmp_path / "step-00000009.tmp-0123abcd" / "dcp").mkdir(parents=True)  # interrupted save

    with pytest.warns(CheckpointWarning) as caught:
        assert store.latest() == 1
    messages = [str(w.message) for w in caught]
    for expected in (
        r"step-00000009\.tmp-0123abcd is partial: an unfinished save",
        r"step-00000005 is corrupt: its COMMITTED marker is unreadable",
        r"step-00000004 is partial: it has no COMMITTED marker",
        r"step-00000003 is corrupt: dcp/__0_0\.distcp has \d+ bytes, COMMITTED says \d+",
        r"step-00000002 is corrupt: rank-00000\.json is missing",
    ):
        assert sum(bool(re.search(expected, m)) for m in messages) == 1, expected
    assert store.steps() == [1]

    fresh_model, fresh_opt = _trained(seed=1)
    target = _state(fresh_model, fresh_opt)
    assert store.load(1, target) == ({"step": 1}, {"step": 1})
    _restore(fresh_model, fresh_opt, target)
    _assert_same(model, opt, fresh_model, fresh_opt)
    with pytest.raises(IncompleteCheckpointError, match="is corrupt"):
        store.load(3, target)

    # the next commit deletes the unfinished save and quarantines each corrupt checkpoint
    with pytest.warns(CheckpointWarning, match="moved it to"):
        _save(store, 6, model, opt)
    assert _committed(tmp_path) == ["quarantine", "step-00000001", "step-00000006"]
    assert _committed(tmp_path / "quarantine") == [f"step-0000000{s}" for s in (2, 3, 4, 5)]


_KILLED_SAVE = """
import sys, torch
from hyla.platform.checkpoint import CheckpointStore
big = {f"w{i}": torch.full((1 << 20,), float(i)) for i in range(48)}  # 192 MiB
CheckpointStore(sys.argv[1], keep_last=2).save(2, big, {"step": 2}, {})
"""


def test_a_save_killed_midway_harms_nothing(tmp_path):
    root = tmp_path / "ckpt"
    store = CheckpointStore(str(root), keep_last=2)
    model, opt = _trained(seed=0)
    _save(store, 1, model, opt)

    child = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(root)], cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not any(p.stat().st_size for p in root.glob("step-00000002.tmp-*/dcp/*.distcp")):
            assert child.poll() is None, f"the save ended (rc {child.returncode}) before the kill"
            assert time.monotonic() < deadline, "the save wrote nothing in 120 s"
            time.sleep(0.002)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert [p.name.split(".")[0] for p in root.glob("*.tmp-*")] == ["step-00000002"]
    assert not (root / "step-00000002").exists()

    with pytest.warns(CheckpointWarning, match="unfinished save"):
        assert store.latest() == 1
    fresh_model, fresh_opt = _trained(seed=1)
    target = _state(fresh_model, fresh_opt)
    store.load(1, target)
    _restore(fresh_model, fresh_opt, target)
    _assert_same(model, opt, fresh_model, fresh_opt)

    _save(store, 3, model, opt)
    assert _committed(root) == ["step-00000001", "step-00000003"]


# ------------------------------------------------------------------- unsafe pickles


class _System:
    """Unpickles into a call of os.system(command)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _touch(path: str) -> str:
    Path(path).touch()
    return path


class _Tripwire:
    """Unpickles into a call of _touch(path)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (_touch, (self.path,))


def test_a_malicious_metadata_pickle_is_refused(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"), keep_last=2)
    model, opt = _trained(seed=0)
    _save(store, 1, model, opt)
    control, sentinel = tmp_path / "control", tmp_path / "sentinel"
    pickle.loads(pickle.dumps(_System(f"touch {control}")))
    assert control.exists()  # the payload is live

    directory = tmp_path / "ckpt" / "step-00000001"
    payload = pickle.dumps(_System(f"touch {sentinel}"))
    (directory / "dcp" / ".metadata").write_bytes(payload)
    marker = json.loads((directory / "COMMITTED").read_text())
    entry = {"size": len(payload), "sha256": _sha256(payload)}
    marker["files"]["dcp/.metadata"] = entry  # the checkpoint verifies
    (directory / "COMMITTED").write_text(json.dumps(marker))
    assert store.latest() == 1

    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system"):
        store.load(1, _state(model, opt))
    assert not sentinel.exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_a_malicious_non_tensor_value_is_refused(tmp_path):
    url = str(tmp_path / "ckpt")
    store = CheckpointStore(url, keep_last=2)
    control, sentinel = tmp_path / "control", tmp_path / "sentinel"
    store.save(1, {"w": torch.ones(3), "extra": _Tripwire(str(control))}, {}, {})
    dcp.load(  # stock DCP unpickles it: the payload is live
        {"w": torch.zeros(3), "extra": None},
        storage_reader=FsspecReader(f"{url}/step-00000001/dcp"),
        no_dist=True,
    )
    assert control.exists()

    store.save(2, {"w": torch.ones(3), "extra": _Tripwire(str(sentinel))}, {}, {})
    with pytest.raises(UnsafeCheckpointError, match="_touch"):
        store.load(2, {"w": torch.zeros(3), "extra": None})
    assert not sentinel.exists()


# ------------------------------------------------------ same-size corruption and fallback


def _flip_byte(data: bytes, sentinel: Path) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]


def _zero_block(data: bytes, sentinel: Path) -> bytes:
    start = len(data) // 3
    return data[:start] + bytes(min(4096, len(data) - start)) + data[start + 4096 :]


def _same_size_pickle(data: bytes, sentinel: Path) -> bytes:
    payload = pickle.dumps(_System(f"touch {sentinel}"))
    assert len(payload) <= len(data)
    return payload + bytes(len(data) - len(payload))  # the unpickler stops at its STOP


CORRUPTIONS = {  # name -> (file of the newest checkpoint, how its bytes change)
    "shard byte flip": ("dcp/__0_0.distcp", _flip_byte),
    "metadata byte flip": ("dcp/.metadata", _flip_byte),
    "same-size malicious pickle": ("dcp/.metadata", _same_size_pickle),
    "zeroed block": ("dcp/__0_0.distcp", _zero_block),
}


def _corrupt_and_fall_back(url: str, fs, corruption: str, sentinel: Path, options=None):
    """Steps 1 and 2 of two different models; corrupt one file of step 2 without changing its
    size: load_latest skips step 2, naming the file, and loads step 1 bit for bit."""
    store = CheckpointStore(url, keep_last=3, storage_options=options)
    first, second = _trained(seed=0), _trained(seed=1)
    _save(store, 1, *first)
    _save(store, 2, *second)
    name, change = CORRUPTIONS[corruption]
    path = f"{store.root}/step-00000002/{name}"
    data = fs.cat_file(path)
    fs.pipe_file(path, change(data, sentinel))
    fs.invalidate_cache()
    assert len(fs.cat_file(path)) == len(data)
    with pytest.warns(CheckpointWarning, match=rf"step-00000002 is corrupt: {name} does not"):
        assert store.latest() == 1  # sizes match: only the hashes can tell

    fresh_model, fresh_opt = _trained(seed=2)
    target = _state(fresh_model, fresh_opt)
    with pytest.warns(CheckpointWarning, match=rf"step-00000002 is corrupt: {name} does not match"):
        loaded = store.load_latest(target)
    assert loaded == (1, {"step": 1}, {"step": 1})
    _restore(fresh_model, fresh_opt, target)
    _assert_same(*first, fresh_model, fresh_opt)
    assert not sentinel.exists()


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_same_size_corruption_falls_back_to_the_previous_checkpoint(tmp_path, corruption):
    local = fsspec.filesystem("file")
    _corrupt_and_fall_back(str(tmp_path / "ckpt"), local, corruption, tmp_path / "sentinel")


def test_no_loadable_checkpoint_is_an_error_and_none_is_a_fresh_start(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"), keep_last=3)
    model, opt = _trained(seed=0)
    assert store.load_latest(_state(model, opt)) is None  # nothing saved yet
    _save(store, 1, model, opt)
    shard = next((tmp_path / "ckpt" / "step-00000001" / "dcp").glob("*.distcp"))
    shard.write_bytes(_flip_byte(shard.read_bytes(), tmp_path))
    with (
        pytest.warns(CheckpointWarning),
        pytest.raises(NoLoadableCheckpointError, match=r"no checkpoint under .* loads; .*"),
    ):
        store.load_latest(_state(model, opt))


def test_a_rewritten_marker_does_not_let_a_pickle_run(tmp_path):
    """An attacker who also rewrites COMMITTED (size and hash of the payload) meets the
    restricted unpickler: the checkpoint is refused, the older one loads."""
    sentinel = tmp_path / "sentinel"
    store = CheckpointStore(str(tmp_path / "ckpt"), keep_last=3)
    first = _trained(seed=0)
    _save(store, 1, *first)
    _save(store, 2, *_trained(seed=1))
    directory = tmp_path / "ckpt" / "step-00000002"
    payload = pickle.dumps(_System(f"touch {sentinel}"))
    (directory / "dcp" / ".metadata").write_bytes(payload)
    marker = json.loads((directory / "COMMITTED").read_text())
    marker["files"]["dcp/.metadata"] = {"size": len(payload), "sha256": _sha256(payload)}
    (directory / "COMMITTED").write_text(json.dumps(marker))
    target = _state(*_trained(seed=2))
    with pytest.warns(CheckpointWarning, match=r"posix\.system"):
        assert store.load_latest(target)[0] == 1
    assert not sentinel.exists()


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


# -------------------------------------------------------------------------------- s3


@pytest.fixture(scope="module")
def s3_endpoint():
    with pytest.MonkeyPatch.context() as env, moto_s3() as endpoint:
        for key, value in S3_ENV.items():
            env.setenv(key, value)
        s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir("hyla-ckpt")
        yield endpoint


@pytest.mark.parametrize("configured_by", ["storage_options", "environment"])
def test_s3_round_trip_and_keep_last(s3_endpoint, configured_by, monkeypatch):
    if configured_by == "environment":
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
        s3fs.S3FileSystem.clear_instance_cache()  # none built from an earlier environment
        options = None
    else:
        monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
        options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    url = f"s3://hyla-ckpt/{configured_by}"
    _round_trip(url, options)

    store = CheckpointStore(url, keep_last=2, storage_options=options)
    model, opt = _trained(seed=0)
    for step in (4, 5, 6):
        _save(store, step, model, opt)
    assert store.steps() == [5, 6]
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(url)) == ["step-00000005", "step-00000006"]


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_s3_same_size_corruption_falls_back(s3_endpoint, corruption, tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = s3fs.S3FileSystem(**options)
    url = f"s3://hyla-ckpt/corrupt-{uuid.uuid4().hex[:8]}"
    _corrupt_and_fall_back(url, fs, corruption, tmp_path / "sentinel", options)


# ------------------------------------------------------------------------- bad input


def test_bad_input_is_refused(tmp_path):
    for keep_last in (0, -1, True, "2", 1.5):
        with pytest.raises(
            ValueError, match=rf"keep_last must be an integer >= 1, got {keep_last!r}"
        ):
            CheckpointStore(str(tmp_path), keep_last=keep_last)
    with pytest.raises(ValueError, match="url must be"):
        CheckpointStore("", keep_last=1)

    store = CheckpointStore(str(tmp_path / "ckpt"), keep_last=1)
    model, opt = _trained(seed=0)
    for step in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match=rf"step must be an integer >= 0, got {step!r}"):
            store.save(step, _state(model, opt), {}, {})
    with pytest.raises(ValueError, match="shared must be a dict, got list"):
        store.save(1, _state(model, opt), [], {})
    with pytest.raises(ValueError, match=r"per_rank\['x'\] has type set"):
        store.save(1, _state(model, opt), {}, {"x": set()})
    with pytest.raises(ValueError, match=r"torch\.distributed is not initialised"):
        store.save(1, _state(model, opt), {}, {}, group=object())
    assert not (tmp_path / "ckpt").exists()  # nothing was written

    assert store.latest() is None
    assert store.steps() == []
    _save(store, 2, model, opt)
    with pytest.raises(
        ValueError, match=r"step 3 has no checkpoint under .*; checkpoints that verify: \[2\]"
    ):
        store.load(3, _state(model, opt))
    with pytest.raises(ValueError, match="step must be an integer >= 0, got -2"):
        store.load(-2, _state(model, opt))


# ------------------------------------------- markers, verification, quarantine (issue 21)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path, monkeypatch) -> tuple[str, dict | None, fsspec.AbstractFileSystem]:
    """(url, storage_options, filesystem) of an empty checkpoint store: a local folder, or a
    prefix of the moto server's bucket."""
    if request.param == "local":
        return str(tmp_path / "ckpt"), None, fsspec.filesystem("file")
    endpoint = request.getfixturevalue("s3_endpoint")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    options = {"client_kwargs": {"endpoint_url": endpoint}}
    url = f"s3://hyla-ckpt/trust-{uuid.uuid4().hex[:8]}"
    return url, options, s3fs.S3FileSystem(**options)


def _snapshot(fs, root: str) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes)."""
    fs.invalidate_cache()
    return {path[len(root) + 1 :]: fs.cat_file(path) for path in fs.find(root)}


def _edit_marker(fs, directory: str, edit) -> None:
    marker = json.loads(fs.cat_file(f"{directory}/COMMITTED"))
    fs.pipe_file(f"{directory}/COMMITTED", json.dumps(edit(marker)).encode())
    fs.invalidate_cache()


def _flip_shard(fs, directory: str) -> None:
    path = f"{directory}/dcp/__0_0.distcp"
    fs.pipe_file(path, _flip_byte(fs.cat_file(path), Path()))
    fs.invalidate_cache()


def _truncate_marker(fs, directory: str) -> None:
    data = fs.cat_file(f"{directory}/COMMITTED")
    fs.pipe_file(f"{directory}/COMMITTED", data[: len(data) // 2])
    fs.invalidate_cache()


_MARKER_CUT_SHORT = """
import resource, signal, sys
from hyla.platform.checkpoint import CheckpointStore
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
CheckpointStore(sys.argv[1], keep_last=2).save(2, {}, {}, {})
"""


def test_a_marker_write_cut_short_leaves_no_marker(tmp_path):
    """A write of COMMITTED that fails midway (a file size limit stops it as a full disk
    would) leaves no marker at all, never a truncated one: the marker is written into the
    save's temporary folder (under a temporary name, renamed), which the failed save
    removes; the checkpoint before it is the newest, without a warning."""
    root = tmp_path / "ckpt"
    store = CheckpointStore(str(root), keep_last=2)
    store.save(1, {}, {}, {})  # the same files as the save cut short below
    first = root / "step-00000001"
    sizes = {p.name: p.stat().st_size for p in first.rglob("*") if p.is_file()}
    marker = sizes.pop("COMMITTED")
    limit = max(sizes.values()) + 1
    assert limit < marker  # only the marker is larger than the limit

    child = subprocess.run(
        [sys.executable, "-c", _MARKER_CUT_SHORT, str(root), str(limit)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert child.returncode != 0 and "File too large" in child.stderr, child.stderr
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        assert store.latest() == 1


def _without(key: str):
    def edit(marker: dict) -> dict:
        del marker["files"]["dcp/__0_0.distcp"][key]
        return marker

    return edit


def _set_files(files):
    return lambda marker: {**marker, "files": files}


def _entry(value):
    def edit(marker: dict) -> dict:
        marker["files"]["dcp/__0_0.distcp"] = value
        return marker

    return edit


def _drop_rank_file(marker: dict) -> dict:
    del marker["files"]["rank-00000.json"]
    return marker


MARKER_TAMPERING = {  # name -> (how COMMITTED of the newest checkpoint changes, why it fails)
    "entry without a hash": (_without("sha256"), r"dcp/__0_0\.distcp has no sha256"),
    "entry without a size": (_without("size"), r"dcp/__0_0\.distcp has no size"),
    "size only, no hash": (_entry(1261), r"dcp/__0_0\.distcp .*got 1261"),
    "hash that is no hash": (
        lambda m: _entry({**m["files"]["dcp/__0_0.distcp"], "sha256": "x"})(m),
        r"dcp/__0_0\.distcp has no sha256",
    ),
    "no files listed": (_set_files({}), "lists no files"),
    "files not a mapping": (_set_files(["dcp/__0_0.distcp"]), "lists no files"),
    "a file left out": (_drop_rank_file, r"rank-00000\.json is not listed"),
    "no world size": (lambda m: {**m, "world_size": 0}, "does not describe step 2"),
    "a list, not an object": (lambda m: [m], "does not describe step 2"),
}


@pytest.mark.parametrize("tampering", MARKER_TAMPERING)
def test_a_marker_cannot_switch_verification_off(storage, tampering):
    """The newest checkpoint has a flipped byte and a marker that would let it through (no
    hash, no size, no files, ...): it fails to verify, naming why (never a KeyError), and
    the one before it is used, bit for bit."""
    url, options, fs = storage
    store = CheckpointStore(url, keep_last=3, storage_options=options)
    first = _trained(seed=0)
    _save(store, 1, *first)
    _save(store, 2, *_trained(seed=1))
    newest = f"{store.root}/step-00000002"
    _flip_shard(fs, newest)
    edit, why = MARKER_TAMPERING[tampering]
    _edit_marker(fs, newest, edit)

    with pytest.warns(CheckpointWarning, match=rf"step-00000002 is corrupt: .*{why}"):
        assert store.latest() == 1
    assert store.steps() == [1]
    model, opt = _trained(seed=2)
    target = _state(model, opt)
    with pytest.warns(CheckpointWarning, match=why):
        assert store.load_latest(target) == (1, {"step": 1}, {"step": 1})
    _restore(model, opt, target)
    _assert_same(*first, model, opt)
    with pytest.raises(IncompleteCheckpointError, match=why):
        store.load(2, target)


def test_an_extra_file_fails_verification(storage):
    url, options, fs = storage
    store = CheckpointStore(url, keep_last=3, storage_options=options)
    _save(store, 1, *_trained(seed=0))
    fs.pipe_file(f"{store.root}/step-00000001/dcp/__1_0.distcp", b"not written by the save")
    fs.invalidate_cache()
    not_listed = r"dcp/__1_0\.distcp is not listed"
    with (
        pytest.warns(CheckpointWarning),
        pytest.raises(NoLoadableCheckpointError, match=not_listed),
    ):
        store.latest()


def test_checkpoints_that_all_fail_are_one_error_and_nothing_is_deleted(storage):
    """Every marker truncated (a crash while writing them, on an older hyla): not a fresh
    start but NoLoadableCheckpointError naming the store and each checkpoint's reason; not a
    byte is deleted or moved."""
    url, options, fs = storage
    store = CheckpointStore(url, keep_last=3, storage_options=options)
    model, opt = _trained(seed=0)
    assert not store.has_checkpoints()
    for step in (1, 2):
        _save(store, step, model, opt)
    for step in (1, 2):
        _truncate_marker(fs, f"{store.root}/step-{step:08d}")
    before = _snapshot(fs, store.root)
    expected = (
        rf"^no checkpoint under {re.escape(url)} verifies.*nothing was deleted.*"
        r"step-00000002 is corrupt: its COMMITTED marker is unreadable.*"
        r"step-00000001 is corrupt: its COMMITTED marker is unreadable"
    )
    assert store.has_checkpoints()
    with pytest.warns(CheckpointWarning), pytest.raises(NoLoadableCheckpointError, match=expected):
        store.latest()
    with pytest.warns(CheckpointWarning), pytest.raises(NoLoadableCheckpointError, match=expected):
        store.load_latest(_state(model, opt))
    assert store.steps() == []
    assert _snapshot(fs, store.root) == before


def test_pruning_counts_verified_checkpoints_and_quarantines_damaged_ones(storage):
    """keep_last=2. A newer checkpoint with a flipped byte, then one with a truncated
    marker: neither takes a slot from the good step 1, and each is moved whole into
    quarantine/ with the reason beside it, never deleted."""
    url, options, fs = storage
    store = CheckpointStore(url, keep_last=2, storage_options=options)
    model, opt = _trained(seed=0)
    _save(store, 1, model, opt)
    _save(store, 2, model, opt)
    _flip_shard(fs, f"{store.root}/step-00000002")
    damaged = {"step-00000002": _snapshot(fs, f"{store.root}/step-00000002")}
    with pytest.warns(
        CheckpointWarning, match=r"step-00000002 is corrupt.*moved it to .*quarantine"
    ):
        _save(store, 3, model, opt)
    assert store.steps() == [1, 3]

    _truncate_marker(fs, f"{store.root}/step-00000003")
    damaged["step-00000003"] = _snapshot(fs, f"{store.root}/step-00000003")
    with pytest.warns(
        CheckpointWarning, match=r"step-00000003 is corrupt.*moved it to .*quarantine"
    ):
        _save(store, 4, model, opt)
    assert store.steps() == [1, 4]
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(store.root)) == [
        "quarantine",
        "step-00000001",
        "step-00000004",
    ]
    for name, files in damaged.items():
        moved = _snapshot(fs, f"{store.root}/quarantine/{name}")
        reason = moved.pop("QUARANTINED").decode()
        assert moved == files
        assert f"{name} is corrupt" in reason


_CORRUPTED_WRITE = """
import sys, torch
from hyla.platform.checkpoint import CheckpointStore
big = {f"w{i}": torch.full((1 << 20,), float(i)) for i in range(48)}  # 192 MiB
step = int(sys.argv[2])
CheckpointStore(sys.argv[1], keep_last=1).save(step, big, {"step": step}, {})
"""


@pytest.mark.parametrize("step", [2, 1], ids=["newer step", "same step"])
def test_a_corrupted_write_is_caught_before_the_old_checkpoint_is_deleted(tmp_path, step):
    """keep_last=1 and a byte of the new checkpoint changed on disk after it was written (a
    silent write corruption): the save reads the new checkpoint back, fails naming the file,
    moves it to quarantine/ and keeps the old one, which still loads; also when the new save
    is of the old one's own step (a restarted run saving that step again), which it would
    replace once verified."""
    root = tmp_path / "ckpt"
    store = CheckpointStore(str(root), keep_last=1)
    first = _trained(seed=0)
    _save(store, 1, *first)

    child = subprocess.Popen(
        [sys.executable, "-c", _CORRUPTED_WRITE, str(root), str(step)],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        shard = None
        while shard is None:  # once 1 MiB is written, change a byte the writer has passed
            assert child.poll() is None, "the save ended before its shard could be changed"
            shard = next(
                (
                    p
                    for p in root.glob(f"step-0000000{step}.tmp-*/dcp/*.distcp")
                    if p.stat().st_size > 1 << 20
                ),
                None,
            )
            time.sleep(0.002)
        with shard.open("r+b") as f:
            f.seek(4096)
            byte = f.read(1)
            f.seek(4096)
            f.write(bytes([byte[0] ^ 0x01]))
        _, stderr = child.communicate()
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 1, stderr
    saved = rf"step-0000000{step}\.tmp-[0-9a-f]+ is corrupt: dcp/__0_0\.distcp does not match"
    assert re.search(saved, stderr), stderr
    assert store.steps() == [1]
    assert sorted(p.name for p in root.iterdir()) == ["quarantine", "step-00000001"]
    assert (root / "quarantine" / f"step-0000000{step}" / "dcp" / "__0_0.distcp").exists()
    model, opt = _trained(seed=2)
    target = _state(model, opt)
    assert store.load_latest(target)[0] == 1
    _restore(model, opt, target)
    _assert_same(*first, model, opt)


# ------------------------------------------------------------------------ a full disk


class _DiskWithRoom(io.RawIOBase):
    """A raw stream with `room` bytes free: `null` (/dev/null) takes the first bytes, then
    `full` (/dev/full), whose every write the kernel refuses with ENOSPC: a short write
    first, as a disk that fills up mid-write gives."""

    def __init__(self, room: int, null: io.RawIOBase, full: io.RawIOBase) -> None:
        self.room, self.null, self.full = room, null, full

    def writable(self) -> bool:
        return True

    def write(self, data) -> int | None:
        view = memoryview(data).cast("B")
        if self.room:
            taken = self.null.write(view[: self.room]) or 0
            self.room -= taken
            return taken
        return self.full.write(view)


@pytest.mark.parametrize("room", [0, 5000])
def test_a_full_disk_under_torch_save_is_found_behind_torchs_own_error(room):
    """torch.save through the save's hashing stream onto a disk that fills up: with no room
    at all the OSError comes through; with some, torch raises its own position mismatch (what
    a full checkpoint.dir used to report; under DCP nothing else). Either way the stream kept
    the real error, with its file, and the save finds it."""
    errors: list[tuple[str, OSError]] = []
    with (
        open("/dev/null", "wb", buffering=0) as null,
        open("/dev/full", "wb", buffering=0) as full,
        pytest.raises((OSError, RuntimeError)) as raised,
    ):
        disk = _DiskWithRoom(room, null, full)
        torch.save(torch.zeros(4096), _HashingStream(disk, "shard.distcp", errors))
    if room:
        assert re.search(r"unexpected pos \d+ vs \d+", str(raised.value))
    path, error = _full_storage(raised.value, errors)
    assert (path, error.errno) == ("shard.distcp", errno.ENOSPC)


def test_a_full_disk_is_named_and_the_last_checkpoint_stays(tmp_path):
    """A real 1 MiB file system: a 2 MiB save fails with one error naming ENOSPC, the file,
    the bytes needed and free; its unfinished folder is gone, the checkpoint before it
    still verifies and loads."""
    with small_disk(tmp_path / "small", "1m") as disk:
        store = CheckpointStore(str(disk / "ckpt"), keep_last=1)
        store.save(1, {"w": torch.ones(1024)}, {"step": 1}, {})
        message = (
            rf"^ENOSPC: no space left on the checkpoint storage writing {disk}/ckpt/"
            r"step-00000002\.tmp-[0-9a-f]+/dcp/__0_0\.distcp: the checkpoint of step 2 needs "
            r"about 2,097,\d{3} bytes from this rank, [\d,]+ bytes free there now; its "
            r"unfinished save step-00000002\.tmp-[0-9a-f]+ was removed"
        )
        with pytest.raises(StorageFullError, match=message):
            store.save(2, {"w": torch.ones(512 * 1024)}, {"step": 2}, {})
        assert sorted(p.name for p in (disk / "ckpt").iterdir()) == ["step-00000001"]
        target = {"w": torch.zeros(1024)}
        assert store.load_latest(target)[:2] == (1, {"step": 1})
        assert torch.equal(target["w"], torch.ones(1024))
