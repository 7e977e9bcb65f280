"""After training, in one process: a run's checkpoint found by name or URL (local and s3),
generation from it equal to hyla.models.generate on the trained model, the export round
trip (safetensors + config + tokenizer, transformers too), the MLflow model and registry,
and the errors of bad input."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import fsspec
import pytest
import torch
from mlflow import MlflowClient

from hyla.models import HybridLM, generate
from hyla.platform.checkpoint import CheckpointWarning, NoLoadableCheckpointError
from hyla.platform.config import compose
from hyla.platform.data import ByteTokenizer, JsonTokenizer
from hyla.platform.paths import CONFIG_FILE, run_folder
from hyla.platform.registry import CHECKPOINT_TAG, STEP_TAG, log_model
from hyla.platform.run_outputs import (
    export,
    exported_tokenizer,
    find_checkpoint,
    generate_text,
    load_model,
)
from hyla.platform.trainer import Trainer
from tests.platform.s3_server import moto_s3_environment

SMALL = [
    "data.seq_len=64",
    "data.batch_size=2",
    "data.max_documents=40",
    "trainer.eval_batches=1",
    "trainer.steps=4",
    "checkpoint.every=2",
    "optim.warmup_steps=2",
    "parallel=none",
]
PROMPT = "def main():\n    "


def _train(storage: str, tracking: str, name: str = "run") -> Trainer:
    """A tiny run, with its config saved in its folder as `hyla train`'s driver saves it."""
    cfg = compose(
        [
            *SMALL,
            f"checkpoint.dir={storage}",
            f"tracking.uri={tracking}",
            f"tracking.run_name={name}",
        ]
    )
    trainer = Trainer(cfg)
    trainer.fit()
    with fsspec.open(f"{run_folder(cfg)}/{CONFIG_FILE}", "w") as f:
        json.dump(cfg.to_dict(), f)
    return trainer.model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, HybridLM]:
    root = tmp_path_factory.mktemp("trained")
    return root, _train(str(root / "store"), f"sqlite:///{root}/mlflow.db")


def _greedy_text(model: HybridLM, prompt: str, new: int) -> str:
    """hyla.models.generate's greedy continuation, cut at the end-of-document token."""
    tokenizer = ByteTokenizer()
    ids = torch.tensor([tokenizer.encode(prompt).tolist()])
    out = generate(model, ids, new)[0, ids.shape[1] :].tolist()
    if tokenizer.eos_id in out:
        out = out[: out.index(tokenizer.eos_id) + 1]
    return tokenizer.decode(out)


def test_generate_from_a_run_equals_generate_on_the_trained_model(trained):
    root, model = trained
    checkpoint = find_checkpoint("run", str(root / "store"))
    assert checkpoint.step == 4
    pieces: list[str] = []
    text = generate_text(load_model(checkpoint), ByteTokenizer(), PROMPT, 24, on_text=pieces.append)
    assert text == _greedy_text(model, PROMPT, 24) and "".join(pieces) == text
    # a checkpoint URL and --step pick older checkpoints of the same run
    older = find_checkpoint(f"{root}/store/run/checkpoints/step-00000002")
    assert (older.step, older.run_name) == (2, "run")
    assert find_checkpoint("run", str(root / "store"), step=2).url == older.url


def test_generate_from_a_checkpoint_on_s3(tmp_path, monkeypatch):
    with moto_s3_environment(monkeypatch):
        fsspec.filesystem("s3").mkdir("hyla-trained")
        model = _train("s3://hyla-trained/runs", f"sqlite:///{tmp_path}/mlflow.db", "s3run")
        checkpoint = find_checkpoint("s3://hyla-trained/runs/s3run/checkpoints/step-00000004")
        text = generate_text(load_model(checkpoint), ByteTokenizer(), PROMPT, 16)
    assert text == _greedy_text(model, PROMPT, 16)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_newest_that_verifies(tmp_path):
    """generate, eval and export find the newest checkpoint that verifies: a flipped byte in
    step 4 sends them to step 2, with a warning naming the file; step 4 asked for by --step
    or by its URL is refused, naming why and only the steps that verify; a run whose
    checkpoints all fail is one error naming each."""
    storage = str(tmp_path / "store")
    _train(storage, f"sqlite:///{tmp_path}/mlflow.db", "hurt")
    root = tmp_path / "store/hurt/checkpoints"
    shard = root / "step-00000004/dcp/__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.warns(CheckpointWarning, match=r"step-00000004 is corrupt: dcp/__0_0\.distcp"):
        checkpoint = find_checkpoint("hurt", storage)
    assert checkpoint.step == 2
    assert isinstance(load_model(checkpoint), HybridLM)
    refused = r"step 4 of run .* does not verify \(.*dcp/__0_0\.distcp does not match .*\); "
    for ref, step in (("hurt", 4), (str(root / "step-00000004"), None)):
        with pytest.raises(ValueError, match=refused + r"checkpoints that verify: \[2\]"):
            find_checkpoint(ref, storage if step else None, step)
    (root / "step-00000002/COMMITTED").write_text("{")
    with (
        pytest.warns(CheckpointWarning),
        pytest.raises(NoLoadableCheckpointError, match=r"step-00000004 .*step-00000002"),
    ):
        find_checkpoint("hurt", storage)


def test_export_round_trip_is_exact_and_holds_only_tensors(trained, tmp_path):
    root, model = trained
    folder = export(find_checkpoint("run", str(root / "store")), tmp_path / "out")
    loaded = HybridLM.from_pretrained(str(folder))
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(
            loaded.logits(loaded.hidden_states(ids)[0]), model.logits(model.hidden_states(ids)[0])
        )
    raw = (folder / "model.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    assert header.pop("__metadata__") == {"format": "pt"}
    assert set(header) == set(model.state_dict())
    assert all(set(entry) == {"dtype", "shape", "data_offsets"} for entry in header.values())
    assert not list(folder.glob("*.pt")) and not list(folder.glob("*.bin"))
    config = json.loads((folder / "config.json").read_text())
    assert config["hyla_source"]["step"] == 4 and config["eos_token_id"] == 256
    # the exported tokenizer is the run's byte tokenizer, as a tokenizers JSON file
    assert isinstance(exported_tokenizer(folder), JsonTokenizer)
    assert exported_tokenizer(folder).encode(PROMPT + "é€").tolist() == (
        ByteTokenizer().encode(PROMPT + "é€").tolist()
    )


def test_an_export_loads_in_transformers_with_the_same_logits_and_tokens(
    trained, tmp_path, monkeypatch
):
    transformers = pytest.importorskip("transformers")
    from transformers import dynamic_module_utils

    cache = str(tmp_path / "hf_modules")  # trust_remote_code copies hyla_hf.py here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", cache)
    monkeypatch.setattr("sys.path", [*__import__("sys").path])
    root, model = trained
    folder = export(find_checkpoint("run", str(root / "store")), tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert ids.tolist()[0] == ByteTokenizer().encode(PROMPT).tolist()
    with torch.no_grad():
        whole = hf(ids, use_cache=False).logits  # the whole-sequence pass, as HybridLM's
        assert torch.equal(whole, model.logits(model.hidden_states(ids)[0]))
    out = hf.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, generate(model, ids, 12))


def test_logged_and_registered_model_points_at_its_run_and_step(trained, tmp_path):
    root, _ = trained
    checkpoint = find_checkpoint("run", str(root / "store"))
    record = checkpoint.tracking()
    client = MlflowClient(record["tracking_uri"])
    status = client.get_run(record["run_id"]).info.status
    folder = export(checkpoint, tmp_path / "out")
    version = log_model(
        folder, record["tracking_uri"], record["run_id"], 4, checkpoint.url, register_as="tiny-lm"
    )
    registered = client.get_model_version("tiny-lm", version)
    assert registered.run_id == record["run_id"]
    assert registered.tags[STEP_TAG] == "4" and registered.tags[CHECKPOINT_TAG] == checkpoint.url
    assert client.get_run(record["run_id"]).info.status == status  # the run keeps its status
    import mlflow.pyfunc

    mlflow.set_tracking_uri(record["tracking_uri"])
    served = mlflow.pyfunc.load_model(f"models:/tiny-lm/{version}")
    expected = generate_text(load_model(checkpoint), ByteTokenizer(), PROMPT, 8)
    assert served.predict([PROMPT], params={"max_new_tokens": 8}) == [expected]


def test_bad_input_gets_clear_errors_and_overwrites_nothing(trained, tmp_path):
    root, _ = trained
    store = str(root / "store")
    with pytest.raises(ValueError, match=r"no run named 'nope' under"):
        find_checkpoint("nope", store)
    with pytest.raises(
        ValueError, match=r"step 3 of run .* does not exist\); checkpoints that verify: \[2, 4\]"
    ):
        find_checkpoint("run", store, step=3)
    with pytest.raises(ValueError, match=r"neither a run name nor a checkpoint URL"):
        find_checkpoint(f"{store}/run")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"exists and is not an empty folder; nothing written"):
        export(find_checkpoint("run", store), taken)
    assert [p.name for p in taken.iterdir()] == ["mine.txt"]
    assert (taken / "mine.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".taken.tmp-*"))
    folder = export(find_checkpoint("run", store), tmp_path / "out")
    weights = folder / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[8:40] = b"\x00" * 32  # the JSON header no longer parses
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        HybridLM.from_pretrained(str(folder))
