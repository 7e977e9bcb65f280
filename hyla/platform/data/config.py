"""The `data` section of a job's config."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

FORMATS = ("auto", "text", "jsonl", "parquet")


@dataclass
class DataConfig:
    """source: "stdlib" (the Python standard library's .py files, on every machine), "mqar"
    (synthetic recall), a token store made by `hyla data prepare` (recognised by its
    manifest), or an fsspec URL or glob of text / jsonl / parquet files (a job prepares
    those into a store once, cached under checkpoint.dir). `sources` with `weights` mixes
    several token stores instead."""

    source: str = "stdlib"
    format: str = "auto"
    text_field: str = "text"
    tokenizer: str = "bytes"  # "bytes", or the path / URL of a `tokenizers` JSON file
    eos_token: str | None = None  # a JSON tokenizer's end-of-document token, e.g. "</s>"
    seq_len: int = 512
    batch_size: int = 4  # sequences per data-parallel rank per step
    shuffle: bool = True
    seed: int = 0
    num_workers: int = 0
    max_documents: int | None = None  # train on at most the first N training documents
    document_masking: bool = False  # batches carry doc_start; no token sees another document
    # Validation: the documents whose text hashes below val_fraction are held out (when a
    # store is prepared, or a raw source read); an evaluation reads the first val_sequences
    # sequences packed from them (MQAR: val_sequences samples of another seed).
    val_fraction: float = 0.005
    val_sequences: int = 8
    mqar_pairs: int = 16  # key-value pairs per MQAR sample
    mqar_samples: int = 100_000
    # A mixture: token store URLs and their weights (sampled in proportion, deterministically).
    sources: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    # Resuming a checkpoint made from other data (another store, seq_len, seed or shuffle)
    # maps its sample position onto other samples: refused unless this is true.
    allow_data_change: bool = False
    shard_bytes: int = 8 << 20  # `prepare`: bytes of source per token-store shard
    prepare_workers: int = 0  # `prepare`: Ray Data workers (0: one per CPU of the cluster)
    cache_mb: int = 256  # per process: the cache of a remote token store's blocks (MB)

    @property
    def val_tokens(self) -> int:
        """The tokens the validation sequences read: val_sequences sequences, and the label
        of the last one's last token."""
        return self.val_sequences * self.seq_len + 1

    def __post_init__(self) -> None:
        positive = ("seq_len", "batch_size", "val_sequences", "mqar_pairs", "mqar_samples")
        for name in (*positive, "shard_bytes", "cache_mb"):
            _check_positive(name, getattr(self, name))
        if self.format not in FORMATS:
            raise ValueError(f"data.format must be one of {FORMATS}, got {self.format!r}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.prepare_workers < 0:
            raise ValueError(f"data.prepare_workers must be >= 0, got {self.prepare_workers}")
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"data.max_documents must be >= 1 or None, got {self.max_documents}")
        if not (math.isfinite(self.val_fraction) and 0 < self.val_fraction <= 1):
            raise ValueError(f"data.val_fraction must be in (0, 1], got {self.val_fraction!r}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"data.seed must be in [0, 2**32), got {self.seed}")
        self._check_mixture()

    def _check_mixture(self) -> None:
        if len(self.weights) != len(self.sources):
            raise ValueError(
                f"data.weights must give one weight per entry of data.sources "
                f"({len(self.sources)}), got {list(self.weights)}"
            )
        bad = [w for w in self.weights if not (math.isfinite(w) and w > 0)]
        if bad:
            raise ValueError(f"data.weights must be finite and > 0, got {list(self.weights)}")
        if self.sources and self.max_documents is not None:
            raise ValueError(
                "data.max_documents applies to one source; with data.sources (a mixture) "
                f"leave it null, got {self.max_documents}"
            )


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"data.{name} must be an integer >= 1, got {value!r}")
