"""Training data: documents from any fsspec URL, tokenised, packed into fixed-length
sequences, read by each data-parallel rank from the run's sample stream
(`hyla.platform.sampling`).

Every rank of a sequence-parallel group receives the same samples (they are split by dp rank
only) and keeps its own pieces of each sequence.
"""

from __future__ import annotations

import json
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import fsspec
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from hyla.models.hybrid import IGNORE_INDEX
from hyla.platform.sampling import RankSampler, SampleStream

# torchdata 0.11 calls torch.set_vital, which torch 2.13 deprecates: noise in every worker's
# output that nothing in hyla can change.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)

FORMATS = ("auto", "text", "jsonl", "parquet")
SUFFIX_FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}


@dataclass
class DataConfig:
    """source: "stdlib" (the Python standard library's .py files, on every machine), "mqar"
    (synthetic recall), or an fsspec URL or glob of text / jsonl / parquet files."""

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
    max_documents: int | None = None  # read at most this many documents (None: all)
    document_masking: bool = False  # batches carry doc_start; no token sees another document
    val_sequences: int = 8  # held out from the end of the token stream (MQAR: another seed)
    mqar_pairs: int = 16  # key-value pairs per MQAR sample
    mqar_samples: int = 100_000

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "val_sequences", "mqar_pairs", "mqar_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name} must be an integer >= 1, got {value!r}")
        if self.format not in FORMATS:
            raise ValueError(f"data.format must be one of {FORMATS}, got {self.format!r}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"data.max_documents must be >= 1 or None, got {self.max_documents}")


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; EOS ends every document. vocab_size 258 leaves one
    id spare (the tiny preset's vocabulary)."""

    eos_id = 256
    vocab_size = 258
    EOS_TOKEN = "<|endoftext|>"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        """The same tokenizer as a `tokenizers` JSON file (for exported models and for
        transformers): byte-level, no merges, so byte b is token b and EOS is EOS_TOKEN."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        # byte-level tokenizers spell each byte as a printable character (GPT-2's mapping)
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        spelled, extra = {}, 0
        for b in range(256):
            if b in printable:
                spelled[b] = chr(b)
            else:
                spelled[b], extra = chr(256 + extra), extra + 1
        vocab = {spelled[b]: b for b in range(256)} | {self.EOS_TOKEN: self.eos_id}
        tokenizer = Tokenizer(models.BPE(vocab, merges=[]))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens([self.EOS_TOKEN])
        return tokenizer.to_str()


class JsonTokenizer:
    """A Hugging Face `tokenizers` JSON file (any fsspec URL); `eos_token` ends documents."""

    def __init__(self, url: str, eos_token: str | None) -> None:
        from tokenizers import Tokenizer

        try:
            with fsspec.open(url, "r", encoding="utf-8") as f:
                self.tokenizer = Tokenizer.from_str(f.read())
        except Exception as e:  # missing file, bad JSON, not a tokenizer: one clear message
            raise ValueError(
                f"data.tokenizer {url!r} is not a readable tokenizers JSON file: {e}"
            ) from e
        eos_id = None if eos_token is None else self.tokenizer.token_to_id(eos_token)
        if eos_token is None or eos_id is None:
            raise ValueError(
                f"data.eos_token must name a token of the tokenizer {url!r} (it ends every "
                f"document), got {eos_token!r}"
            )
        self.eos_token, self.eos_id = eos_token, eos_id
        self.vocab_size = self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text).ids, dtype=np.int32)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def load_tokenizer(cfg: DataConfig) -> ByteTokenizer | JsonTokenizer:
    if cfg.tokenizer == "bytes":
        return ByteTokenizer()
    return JsonTokenizer(cfg.tokenizer, cfg.eos_token)


def stdlib_files() -> list[str]:
    """The standard library's own .py files (not site-packages), in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        str(p) for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts
    )


def _format_of(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return SUFFIX_FORMATS.get(Path(path).suffix, "text")


def source_files(cfg: DataConfig) -> list:
    """The fsspec OpenFiles of `cfg.source`, sorted; ValueError naming the source when it is
    not a URL fsspec knows, or matches no file."""
    if cfg.source == "stdlib":
        return [fsspec.open(p, "rb") for p in stdlib_files()]
    try:
        files = fsspec.open_files(cfg.source, "rb")
    except (ValueError, ImportError) as e:  # an unknown protocol, or its package is missing
        raise ValueError(f"data.source {cfg.source!r} is not a readable fsspec URL: {e}") from None
    if not files:
        raise ValueError(f"data.source matched no files: {cfg.source!r}")
    return sorted(files, key=lambda f: f.path)


def read_documents(cfg: DataConfig) -> Iterator[str]:
    """The documents of `cfg.source`, files in sorted order. A file that cannot be read or
    parsed raises ValueError naming it (and the line, for jsonl)."""
    for f in source_files(cfg):
        fmt = _format_of(f.path, cfg.format)
        try:
            with f as handle:
                yield from _documents_of(handle, fmt, cfg.text_field, f.path)
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            raise ValueError(f"data.source file {f.path} cannot be read: {e}") from None


def _documents_of(handle, fmt: str, field: str, path: str) -> Iterator[str]:
    if fmt == "text":
        yield handle.read().decode("utf-8", errors="replace")
    elif fmt == "jsonl":
        for line_no, line in enumerate(handle, 1):
            if line.strip():
                yield _jsonl_text(line, field, path, line_no)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(handle, columns=[field])
        except (pa.ArrowException, KeyError) as e:
            raise ValueError(
                f"data.source file {path} is not parquet with a column data.text_field="
                f"{field!r}: {e}"
            ) from None
        yield from (str(x) for x in table.column(field).to_pylist())


def _jsonl_text(line: bytes, field: str, path: str, line_no: int) -> str:
    try:
        record = json.loads(line)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        column = f" column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise ValueError(
            f"data.source file {path} line {line_no}{column} is not JSON: {e}"
        ) from None
    if not isinstance(record, dict):
        raise ValueError(
            f"data.source file {path} line {line_no} must be a JSON object with "
            f"data.text_field {field!r}, got {type(record).__name__}"
        )
    if field not in record:
        raise ValueError(
            f"data.text_field {field!r} is missing in {path} line {line_no}; "
            f"keys there: {sorted(record)}"
        )
    return str(record[field])


def token_stream(cfg: DataConfig, tokenizer: ByteTokenizer | JsonTokenizer) -> np.ndarray:
    """All documents tokenised and concatenated, each followed by EOS."""
    parts = []
    for i, doc in enumerate(read_documents(cfg)):
        if cfg.max_documents is not None and i >= cfg.max_documents:
            break
        parts += [tokenizer.encode(doc), np.array([tokenizer.eos_id], dtype=np.int32)]
    if not parts:
        raise ValueError(f"data.source {cfg.source!r} has no documents")
    return np.concatenate(parts)


def document_starts(stream: np.ndarray, eos_id: int) -> np.ndarray:
    """True where a document begins: the stream's first token and every token after an EOS."""
    starts = np.ones(len(stream), dtype=bool)
    starts[1:] = stream[:-1] == eos_id
    return starts


class SizedDataset(Protocol):
    """What the loaders read: a map-style dataset of known length (PackedSequences, MQAR)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> dict[str, Tensor]: ...


class PackedSequences(Dataset):
    """Sample i: tokens [i L, (i + 1) L] of the stream (L = seq_len), as input_ids and the
    next-token labels; with `doc_start` (one flag per stream token, see document_starts),
    also that sample's flags."""

    def __init__(
        self, stream: np.ndarray, seq_len: int, doc_start: np.ndarray | None = None
    ) -> None:
        # int32, not int64: every rank of a sequence-parallel group holds the whole stream.
        self.tokens = torch.from_numpy(stream.astype(np.int32, copy=False))
        self.seq_len = seq_len
        self.doc_start = None if doc_start is None else torch.from_numpy(doc_start)
        if len(self) < 1:
            raise ValueError(
                f"the data has {len(stream)} tokens, fewer than one sequence of data.seq_len + 1 "
                f"= {seq_len + 1}"
            )

    def __len__(self) -> int:
        return (self.tokens.numel() - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        begin, end = i * self.seq_len, (i + 1) * self.seq_len
        window = self.tokens[begin : end + 1].long()
        sample = {"input_ids": window[:-1], "labels": window[1:]}
        if self.doc_start is not None:
            sample["doc_start"] = self.doc_start[begin:end]
        return sample


class MQAR(Dataset):
    """Multi-query associative recall: `pairs` key-value pairs, then the keys again in a
    shuffled order; the loss is only on recalling each key's value. Keys and values come
    from disjoint token ranges. Sample i depends only on (seed, i): resumes are exact."""

    def __init__(self, seq_len: int, pairs: int, samples: int, vocab_size: int, seed: int) -> None:
        need = 4 * pairs
        if seq_len < need:
            raise ValueError(
                f"data.seq_len must be >= 4 * data.mqar_pairs = {need} for MQAR, got {seq_len}"
            )
        if vocab_size < 2 * pairs + 2:
            raise ValueError(f"MQAR needs a vocabulary of >= {2 * pairs + 2}, got {vocab_size}")
        self.seq_len, self.pairs, self.samples = seq_len, pairs, samples
        self.half, self.seed = (vocab_size - 1) // 2, seed

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        n, half = self.pairs, self.half
        keys = torch.randperm(half, generator=gen)[:n] + 1
        values = torch.randint(half + 1, 2 * half + 1, (n,), generator=gen)
        order = torch.randperm(n, generator=gen)
        ids = torch.zeros(self.seq_len + 1, dtype=torch.int64)
        ids[0 : 2 * n : 2], ids[1 : 2 * n : 2] = keys, values
        ids[2 * n : 4 * n : 2], ids[2 * n + 1 : 4 * n : 2] = keys[order], values[order]
        labels = torch.full((self.seq_len,), IGNORE_INDEX, dtype=torch.int64)
        labels[2 * n : 4 * n : 2] = values[order]  # after each repeated key, its value
        return {"input_ids": ids[:-1], "labels": labels}


def fitting_tokenizer(cfg: DataConfig, vocab_size: int) -> ByteTokenizer | JsonTokenizer:
    """The tokenizer, checked against the model's vocabulary."""
    tokenizer = load_tokenizer(cfg)
    if vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size must be >= {tokenizer.vocab_size} for the tokenizer "
            f"data.tokenizer={cfg.tokenizer!r}, got {vocab_size}"
        )
    return tokenizer


def check_data(cfg: DataConfig, vocab_size: int, dp: int) -> None:
    """What a job checks before it starts: the tokenizer loads and fits the model, the source
    reads and parses, and it holds the validation tail plus one global batch (dp x
    data.batch_size sequences). Reads only as many documents as that takes."""
    if cfg.source == "mqar":
        build_loader(cfg, build_dataset(cfg, vocab_size), 0, dp)
        return
    tokenizer = fitting_tokenizer(cfg, vocab_size)
    need = cfg.val_sequences * cfg.seq_len + 1 + dp * cfg.batch_size * cfg.seq_len
    have = 0
    for i, doc in enumerate(read_documents(cfg)):
        if (cfg.max_documents is not None and i >= cfg.max_documents) or have >= need:
            break
        have += len(tokenizer.encode(doc)) + 1  # and its EOS
    if have < need:
        raise ValueError(
            f"data.source {cfg.source!r} holds {have} tokens, fewer than the {need} that "
            f"data.val_sequences ({cfg.val_sequences}) validation sequences plus one global "
            f"batch of dp ({dp}) x data.batch_size ({cfg.batch_size}) sequences of "
            f"data.seq_len ({cfg.seq_len}) tokens need"
        )


def build_dataset(cfg: DataConfig, vocab_size: int) -> SizedDataset:
    """The training set (everything but the validation split)."""
    return build_datasets(cfg, vocab_size)[0]


def build_datasets(cfg: DataConfig, vocab_size: int) -> tuple[SizedDataset, SizedDataset]:
    """(train, validation). Text: the last data.val_sequences sequences of the token stream
    are held out. MQAR: validation samples are drawn with another seed."""
    if cfg.source == "mqar":
        if cfg.document_masking:
            raise ValueError("data.document_masking needs a text source (MQAR has one document)")
        pairs, val_seed = cfg.mqar_pairs, cfg.seed + 1_000_003
        return (
            MQAR(cfg.seq_len, pairs, cfg.mqar_samples, vocab_size, cfg.seed),
            MQAR(cfg.seq_len, pairs, cfg.val_sequences, vocab_size, val_seed),
        )
    tokenizer = fitting_tokenizer(cfg, vocab_size)
    stream = token_stream(cfg, tokenizer)
    held_out = cfg.val_sequences * cfg.seq_len + 1
    if len(stream) < held_out + cfg.seq_len + 1:
        raise ValueError(
            f"the data has {len(stream)} tokens, too few for data.val_sequences "
            f"({cfg.val_sequences}) validation sequences plus one training sequence of "
            f"data.seq_len + 1 = {cfg.seq_len + 1} tokens"
        )
    if not cfg.document_masking:
        return (
            PackedSequences(stream[:-held_out], cfg.seq_len),
            PackedSequences(stream[-held_out:], cfg.seq_len),
        )
    starts = document_starts(stream, tokenizer.eos_id)  # before the split: it needs the EOS
    return (
        PackedSequences(stream[:-held_out], cfg.seq_len, starts[:-held_out]),
        PackedSequences(stream[-held_out:], cfg.seq_len, starts[-held_out:]),
    )


def build_loader(
    cfg: DataConfig,
    dataset: SizedDataset,
    dp_rank: int,
    dp_size: int,
    grad_accum: int = 1,
    start: int = 0,
) -> StatefulDataLoader:
    """This dp rank's endless loader over the run's sample stream (`hyla.platform.sampling`),
    from stream position `start`: the samples the run has consumed."""
    if len(dataset) < dp_size * cfg.batch_size:
        raise ValueError(
            f"the dataset has {len(dataset)} sequences, fewer than one step needs: "
            f"dp ({dp_size}) x data.batch_size ({cfg.batch_size})"
        )
    sampler = RankSampler(
        SampleStream(len(dataset), cfg.shuffle, cfg.seed),
        dp=dp_size,
        rank=dp_rank,
        batch_size=cfg.batch_size,
        grad_accum=grad_accum,
        start=start,
    )
    return StatefulDataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers
    )
