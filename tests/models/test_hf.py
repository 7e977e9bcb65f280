"""Exported folders through transformers' Auto classes: same logits, greedy tokens and loss
as HybridLM itself; corrupt weights refused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hyla.models import HybridLM, ModelConfig, generate

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "LGDMA": ModelConfig(layers="LGDMA", d_model=32, n_heads=2, vocab_size=64, init_std=0.2),
    "untied_attention": ModelConfig(
        layers="LA", d_model=32, n_heads=2, vocab_size=64, init_std=0.2, tie_embeddings=False
    ),
}


@pytest.fixture(autouse=True)
def offline_modules_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """trust_remote_code copies hyla_hf.py into HF_MODULES_CACHE (read when transformers is
    imported, hence the module attribute) and adds that folder to sys.path."""
    from transformers import dynamic_module_utils

    cache = str(tmp_path / "hf_modules")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", cache)
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", cache)
    monkeypatch.setattr(sys, "path", [*sys.path])


def _export(cfg: ModelConfig, folder: Path) -> HybridLM:
    HybridLM(cfg).save_pretrained(str(folder))
    return HybridLM.from_pretrained(str(folder))


def _load(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


def _ids(vocab: int, shape: tuple[int, int]) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_auto_model_matches_hybrid_lm(name: str, tmp_path: Path):
    cfg = CONFIGS[name]
    ref = _export(cfg, tmp_path / "model")
    config = transformers.AutoConfig.from_pretrained(tmp_path / "model", trust_remote_code=True)
    assert config.model_type == "hyla" and config.hyla_model["layers"] == cfg.layers
    hf = _load(tmp_path / "model")
    ids = _ids(cfg.vocab_size, (2, 12))
    with torch.no_grad():
        logits = hf(ids, use_cache=False).logits  # the whole-sequence pass, as HybridLM's
        assert torch.equal(logits, ref.logits(ref.hidden_states(ids)[0]))

        labels = ids.clone()
        labels[0, 3:6] = -100
        expected = F.cross_entropy(
            logits[:, :-1].reshape(-1, cfg.vocab_size), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        torch.testing.assert_close(hf(ids, labels=labels).loss, expected)

        prompt = ids[:, :5]  # generate decodes with the cache, through hyla's own code path
        tokens = hf.generate(prompt, max_new_tokens=8, do_sample=False)
        assert torch.equal(tokens, generate(ref, prompt, 8))


def test_save_round_trips(tmp_path: Path):
    cfg = CONFIGS["untied_attention"]
    ref = _export(cfg, tmp_path / "model")
    hf = _load(tmp_path / "model")
    assert hf.config.use_cache  # generate() keeps a cache unless told otherwise
    hf.save_pretrained(tmp_path / "again")
    again = HybridLM.from_pretrained(str(tmp_path / "again"))
    for (key, value), (key_ref, value_ref) in zip(
        again.state_dict().items(), ref.state_dict().items(), strict=True
    ):
        assert key == key_ref and torch.equal(value, value_ref)


def test_corrupt_weights_are_refused(tmp_path: Path):
    folder = tmp_path / "model"
    _export(CONFIGS["untied_attention"], folder)
    weights = folder / "model.safetensors"
    with weights.open("r+b") as f:  # the first 8 bytes give the JSON header's length
        f.seek(8)
        f.write(b"\xff" * 16)
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        _load(folder)


def test_loading_keywords_follow_transformers_protocol(tmp_path: Path):
    """What lm-evaluation-harness 0.4.13 and transformers 5.25 pass loads (a subfolder, a
    device_map dict onto one device, hub and planning keywords, keywords unknown today);
    dtype and config attributes apply; what would change the weights is refused."""
    cfg = CONFIGS["untied_attention"]
    folder = tmp_path / "model"
    ref = _export(cfg, folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder,
        subfolder="",
        trust_remote_code=True,
        revision="main",
        dtype=torch.bfloat16,
        gguf_file=None,
        quantization_config=None,
        device_map={"": "cpu"},
        max_memory=None,
        low_cpu_mem_usage=True,
        output_hidden_states=False,
        use_cache=False,
        a_loading_keyword_of_the_future=1,
    )
    assert not hf.config.output_hidden_states and not hf.config.use_cache
    pairs = zip(hf.model.state_dict().values(), ref.state_dict().values(), strict=True)
    for value, value_ref in pairs:
        assert value.dtype == torch.bfloat16 and torch.equal(value, value_ref.bfloat16())
    nested = _load_with(tmp_path, subfolder="model", torch_dtype="auto")
    assert nested.model.cfg == cfg and next(nested.parameters()).dtype == torch.float32
    with pytest.raises(TypeError, match="load_in_8bit"):
        _load_with(folder, load_in_8bit=True)
    with pytest.raises(ValueError, match="one device"):
        _load_with(folder, device_map={"model.embed": "cpu", "model.head": "disk"})
    with pytest.raises(ValueError, match="architecture"):
        _load_with(folder, vocab_size=cfg.vocab_size + 1)
    with pytest.raises(ValueError, match="dtype"):
        _load_with(folder, dtype="int8")


def _load_with(folder: Path, **kwargs):
    from hyla.models.hf import HylaForCausalLM

    return HylaForCausalLM.from_pretrained(folder, **kwargs)
