"""Evaluating a checkpoint: the trainer's validation pass over the model of one checkpoint,
on any data the trainer accepts (its validation split: data.val_sequences sequences packed
from the documents held out at data.val_fraction), at the job's dp x sp, plus bits per
byte."""

from __future__ import annotations

import math

import torch

from hyla.models.hybrid import IGNORE_INDEX
from hyla.platform.config import JobConfig
from hyla.platform.data import ByteTokenizer, JsonTokenizer, SizedDataset, load_tokenizer
from hyla.platform.trainer import Trainer

# what `hyla eval` logs to the run's MLflow run (the trainer's val_* -> eval_*)
EVAL_METRICS = {
    "val_loss": "eval_loss",
    "val_perplexity": "eval_perplexity",
    "val_accuracy": "eval_accuracy",
    "val_bits_per_byte": "eval_bits_per_byte",
}


def evaluate_checkpoint(
    cfg: JobConfig, step: int, device: torch.device | None = None
) -> dict[str, float]:
    """Collective over the job's ranks: the metrics of `Trainer.evaluate` (trainer.eval_batches
    batches) for the model of checkpoint `step`, with val_bits_per_byte for text sources."""
    trainer = Trainer(cfg, device)
    trainer.load_weights(step)
    metrics = trainer.evaluate()
    if cfg.data.source != "mqar":
        tokens, n_bytes = _targets(
            trainer.val_set,
            load_tokenizer(cfg.data),
            cfg.data.batch_size * cfg.trainer.eval_batches,
        )
        metrics["val_bits_per_byte"] = (
            metrics["val_loss"] * tokens / (math.log(2) * max(n_bytes, 1))
        )
    return metrics


def _targets(
    val_set: SizedDataset, tokenizer: ByteTokenizer | JsonTokenizer, sequences: int
) -> tuple[int, int]:
    """(counted target tokens, their UTF-8 bytes) in the first `sequences` sequences, the ones
    `Trainer.evaluate` reads."""
    tokens = n_bytes = 0
    for i in range(min(sequences, len(val_set))):
        labels = val_set[i]["labels"]
        ids = labels[labels != IGNORE_INDEX].tolist()
        tokens += len(ids)
        if isinstance(tokenizer, ByteTokenizer):  # exact: one byte per token below 256
            n_bytes += sum(1 for t in ids if t < 256)
        else:
            n_bytes += len(tokenizer.decode(ids).encode("utf-8"))
    return tokens, n_bytes
