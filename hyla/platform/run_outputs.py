"""What a run leaves behind, ready to use: its checkpoints found by run name or by URL, the
model of one checkpoint loaded in one process, and exported as a folder (safetensors, config,
tokenizer) that `HybridLM.from_pretrained` and transformers load.

A run is found as `hyla resume` finds it: by name under a storage (checkpoint.dir, default the
configs' own), or by the URL of one checkpoint (<storage>/<run>/checkpoints/step-00000042)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import fsspec
import torch
from torch import Tensor

from hyla.models import HybridLM, generate
from hyla.models.pretrained import CONFIG_FILE as MODEL_CONFIG_FILE
from hyla.platform.checkpoint import CheckpointStore, IncompleteCheckpointError, step_of_directory
from hyla.platform.config import JobConfig, check_run_name, compose, from_dict
from hyla.platform.data import ByteTokenizer, JsonTokenizer, load_tokenizer
from hyla.platform.paths import CONFIG_FILE, TRACKING_FILE

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


@dataclass(frozen=True)
class TrainedCheckpoint:
    """One checkpoint of a run that verifies, with the config the run trained with."""

    cfg: JobConfig
    folder: str  # the run's folder: <storage>/<run name>
    store: CheckpointStore
    step: int

    @property
    def url(self) -> str:
        return self.store.url_of(self.step)

    @property
    def run_name(self) -> str:
        return self.folder.rstrip("/").rsplit("/", 1)[-1]

    def tracking(self) -> dict | None:
        """The run's MLflow run ({"run_id", "tracking_uri"}), if it recorded one."""
        try:
            with fsspec.open(f"{self.folder}/{TRACKING_FILE}", "r") as f:
                return json.load(f)
        except FileNotFoundError:
            return None


def run_config(folder: str) -> JobConfig:
    """The config a run was started with (saved in its folder by the driver)."""
    url = f"{folder.rstrip('/')}/{CONFIG_FILE}"
    try:
        with fsspec.open(url, "r") as f:
            return from_dict(json.load(f))
    except FileNotFoundError:
        run, root = folder.rstrip("/").rsplit("/", 1)[::-1]
        raise ValueError(
            f"no run named {run!r} under {root!r} (looked for {url}); pass --storage with the "
            f"run's checkpoint.dir"
        ) from None


def run_folder_of(run: str, storage: str | None, what: str = "the run") -> str:
    """<storage>/<run>: the folder of the run named `run` (storage default: the configs')."""
    check_run_name(run, what)
    root = storage or compose([]).checkpoint.dir
    return f"{root.rstrip('/')}/{run}"


def find_checkpoint(
    ref: str, storage: str | None = None, step: int | None = None
) -> TrainedCheckpoint:
    """`ref` is a run name (under `storage`) or a checkpoint's URL; `step` picks one of the
    run's checkpoints (default: the newest that verifies, each newer one skipped with a
    CheckpointWarning). The checkpoint is verified: every file read against its hash."""
    ref_step = step_of_directory(ref) if ("/" in ref or "://" in ref) else None
    if ref_step is not None:
        if step is not None and step != ref_step:
            raise ValueError(f"--step {step} contradicts the checkpoint URL {ref!r}")
        checkpoints = ref.rstrip("/").rsplit("/", 1)[0]
        folder, step = checkpoints.rsplit("/", 1)[0], ref_step
    elif "/" in ref or "://" in ref:
        raise ValueError(
            f"{ref!r} is neither a run name nor a checkpoint URL (one ending in "
            f"/checkpoints/step-<8 digits>)"
        )
    else:
        folder = run_folder_of(ref, storage)
    cfg = run_config(folder)
    store = CheckpointStore(f"{folder}/checkpoints", cfg.checkpoint.keep_last)
    if step is None:
        step = store.latest()  # NoLoadableCheckpointError when there are some and none verify
        if step is None:
            raise ValueError(f"run {ref!r} has no checkpoint under {store.url}")
    else:
        _check_verifies(store, step, folder)
    return TrainedCheckpoint(cfg, folder, store, step)


def _check_verifies(store: CheckpointStore, step: int, folder: str) -> None:
    try:
        store.verify(step)
    except IncompleteCheckpointError as e:
        raise ValueError(
            f"step {step} of run {folder!r} does not verify ({e}); checkpoints that verify: "
            f"{store.steps()}"
        ) from None


def load_model(checkpoint: TrainedCheckpoint, device: str = "cpu") -> HybridLM:
    """The checkpoint's model in this process (verified as a resume verifies it), in eval mode.
    DCP reshards what any dp x sp (DDP or FSDP2) saved into one whole model."""
    model = HybridLM(checkpoint.cfg.model).to(device)
    checkpoint.store.load(checkpoint.step, {"model": model.state_dict()})
    return model.eval()


def export(checkpoint: TrainedCheckpoint, out: str | Path) -> Path:
    """Write the checkpoint's model, config and tokenizer into `out`, which must not exist or
    be empty: the folder appears whole (written beside it, then renamed) or not at all."""
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {str(out)!r} exists and is not an empty folder; nothing written")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tokenizer = load_tokenizer(checkpoint.cfg.data)
        eos_token = write_tokenizer(tokenizer, staging)
        source = {
            "run_name": checkpoint.run_name,
            "checkpoint": checkpoint.url,
            "step": checkpoint.step,
            "run_id": (checkpoint.tracking() or {}).get("run_id"),
        }
        load_model(checkpoint).save_pretrained(
            str(staging),
            extra={"eos_token_id": tokenizer.eos_id, "eos_token": eos_token, "hyla_source": source},
        )
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def write_tokenizer(tokenizer: ByteTokenizer | JsonTokenizer, folder: Path) -> str:
    """tokenizer.json (+ tokenizer_config.json for transformers' AutoTokenizer); returns the
    end-of-document token."""
    if isinstance(tokenizer, ByteTokenizer):
        text, eos = tokenizer.to_json(), ByteTokenizer.EOS_TOKEN
    else:
        text, eos = tokenizer.tokenizer.to_str(), tokenizer.eos_token
    (folder / TOKENIZER_FILE).write_text(text)
    (folder / TOKENIZER_CONFIG_FILE).write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos}, indent=1)
    )
    return eos


def exported_tokenizer(folder: str | Path) -> JsonTokenizer:
    """The tokenizer of an exported folder."""
    folder = Path(folder)
    config = json.loads((folder / MODEL_CONFIG_FILE).read_text())
    return JsonTokenizer(str(folder / TOKENIZER_FILE), config.get("eos_token"))


def generate_text(
    model: HybridLM,
    tokenizer: ByteTokenizer | JsonTokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    on_text: Callable[[str], None] | None = None,
) -> str:
    """The prompt's continuation (decoding stops early at the end-of-document token).
    `on_text` receives it piece by piece as it is decoded; a piece that ends inside a
    character (a byte of UTF-8, a partial token) waits for the rest of it."""
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(f"--max-new-tokens must be an integer >= 1, got {max_new_tokens!r}")
    ids = [int(i) for i in tokenizer.encode(prompt)]
    if not ids:
        raise ValueError("--prompt must not be empty")
    new: list[int] = []
    shown = 0

    def stream(token: Tensor) -> None:
        nonlocal shown
        new.append(int(token[0]))
        text = tokenizer.decode(new)
        if on_text is not None and not text.endswith("\ufffd") and len(text) > shown:
            on_text(text[shown:])
            shown = len(text)
        if new[-1] == tokenizer.eos_id:
            raise _EndOfDocument

    generator = torch.Generator().manual_seed(seed)
    prompt_ids = torch.tensor([ids], device=model.embed.weight.device)
    with contextlib.suppress(_EndOfDocument):
        generate(
            model,
            prompt_ids,
            max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            generator=generator,
            on_token=stream,
        )
    text = tokenizer.decode(new)
    if on_text is not None and len(text) > shown:
        on_text(text[shown:])
    return text


class _EndOfDocument(Exception):
    """Stops decoding at the end-of-document token."""
