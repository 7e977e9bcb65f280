"""From a job's `data` section to its datasets and each dp rank's loader: which source
(MQAR, a token store, a mixture of stores, or a raw source read into memory), its
validation split, its preflight, and the identity a checkpoint records."""

from __future__ import annotations

import hashlib
import json
import warnings

from torchdata.stateful_dataloader import StatefulDataLoader

from hyla.platform.data.config import DataConfig
from hyla.platform.data.packing import (
    MQAR,
    ArrayTokens,
    Mixture,
    PackedSequences,
    SizedDataset,
    TokenSource,
)
from hyla.platform.data.sources import split_documents, token_streams
from hyla.platform.data.store import TokenStore, is_store
from hyla.platform.data.tokenizers import fitting_tokenizer, load_tokenizer
from hyla.platform.sampling import ORDER, RankSampler, SampleStream

# torchdata 0.11 calls torch.set_vital, which torch 2.13 deprecates: noise in every worker's
# output that nothing in hyla can change.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)


def open_store(url: str, cfg: DataConfig, vocab_size: int) -> TokenStore:
    """The token store at `url`, checked against the job: made with data.tokenizer, its
    vocabulary within the model's, every shard file present at its size (no hashing: the
    blocks are checked when first read)."""
    store = TokenStore(url, cfg.cache_mb)
    made_with = store.manifest["tokenizer"]
    tokenizer = load_tokenizer(cfg)
    if made_with["sha256"] != tokenizer.sha256:
        raise ValueError(
            f"token store {url} was prepared with the tokenizer {made_with['name']!r} "
            f"(eos {made_with['eos_token']!r}), not data.tokenizer={cfg.tokenizer!r}; set "
            f"data.tokenizer={made_with['name']} data.eos_token={made_with['eos_token']}"
        )
    if made_with["vocab_size"] > vocab_size:
        raise ValueError(
            f"model.vocab_size must be >= {made_with['vocab_size']} for token store {url} "
            f"(its tokenizer's vocabulary), got {vocab_size}"
        )
    store.check_files()
    return store


def _split(
    cfg: DataConfig,
    train: TokenSource,
    train_end: int,
    validation: TokenSource,
    eos_id: int,
    name: str,
    more_validation: str,
) -> tuple[PackedSequences, PackedSequences]:
    """(train, validation): sequences packed from training tokens [0, train_end) (there may
    be none: a store to evaluate on; `build_loader` refuses to train on too few), and the
    first data.val_sequences sequences packed from the validation documents.
    `more_validation`: how to hold out more documents."""
    if len(validation) < cfg.val_tokens:
        raise _too_little_validation(cfg, name, len(validation), more_validation)
    eos = eos_id if cfg.document_masking else None
    return (
        PackedSequences(train, cfg.seq_len, eos, 0, train_end),
        PackedSequences(validation, cfg.seq_len, eos, 0, cfg.val_tokens),
    )


def _too_little_validation(cfg: DataConfig, name: str, have: int, more: str) -> ValueError:
    return ValueError(
        f"{name} holds {have} tokens of validation documents, fewer than the "
        f"{cfg.val_tokens} that data.val_sequences ({cfg.val_sequences}) "
        f"sequences of data.seq_len ({cfg.seq_len}) tokens need; lower data.val_sequences, "
        f"or {more}"
    )


def _raise_val_fraction(cfg: DataConfig) -> str:
    """How to hold out more documents of a raw source."""
    if cfg.val_fraction < 1:
        return f"raise data.val_fraction ({cfg.val_fraction})"
    return "add documents to data.source"


def _store_split(cfg: DataConfig, store: TokenStore) -> tuple[PackedSequences, PackedSequences]:
    """A store's split: its training documents (the first data.max_documents of them when
    that is set) and its validation documents."""
    train = store.part(validation=False)
    end = len(train) if cfg.max_documents is None else train.documents_end(cfg.max_documents)
    name = f"token store {store.url}"
    fraction = store.manifest["val_fraction"]
    more = (
        f"prepare it again with a larger data.val_fraction (it was prepared with {fraction}; "
        f"a job prepares a raw data.source again by itself)"
        if fraction < 1
        else "prepare it from more documents"
    )
    return _split(cfg, train, end, store.part(validation=True), store.eos_id, name, more)


def build_datasets(cfg: DataConfig, vocab_size: int) -> tuple[SizedDataset, SizedDataset]:
    """(train, validation). A token store or a raw source: training sequences are packed
    from the training documents, validation sequences from the documents held out at
    data.val_fraction (`hyla.platform.data.sources.held_out`). A mixture: each store's own
    split, validation is every store's in turn. MQAR: validation samples are drawn with
    another seed."""
    if cfg.source == "mqar" and not cfg.sources:
        if cfg.document_masking:
            raise ValueError("data.document_masking needs a text source (MQAR has one document)")
        pairs, val_seed = cfg.mqar_pairs, cfg.seed + 1_000_003
        return (
            MQAR(cfg.seq_len, pairs, cfg.mqar_samples, vocab_size, cfg.seed),
            MQAR(cfg.seq_len, pairs, cfg.val_sequences, vocab_size, val_seed),
        )
    if cfg.sources:
        splits = [_store_split(cfg, open_store(url, cfg, vocab_size)) for url in cfg.sources]
        train = Mixture([t for t, _ in splits], list(cfg.weights))
        val = Mixture([v for _, v in splits], [1.0] * len(splits))
        return train, val
    if is_store(cfg.source):
        return _store_split(cfg, open_store(cfg.source, cfg, vocab_size))
    return _in_memory_split(cfg, vocab_size)


def _in_memory_split(cfg: DataConfig, vocab_size: int) -> tuple[SizedDataset, SizedDataset]:
    """A raw source tokenised in this process (library use and tests; a job prepares raw
    sources into a token store once instead, see hyla.jobs.training_job)."""
    tokenizer = fitting_tokenizer(cfg, vocab_size)
    train, validation = token_streams(cfg, tokenizer)
    name, more = f"data.source {cfg.source!r}", _raise_val_fraction(cfg)
    eos = tokenizer.eos_id
    return _split(cfg, ArrayTokens(train), len(train), ArrayTokens(validation), eos, name, more)


def build_dataset(cfg: DataConfig, vocab_size: int) -> SizedDataset:
    """The training set (everything but the validation split)."""
    return build_datasets(cfg, vocab_size)[0]


def data_identity(cfg: DataConfig) -> dict[str, object]:
    """What a checkpoint's data position means: the data (a store's manifest hash, a
    mixture's hashes and weights, or a raw source's keys) and how it is cut and ordered. A
    resume whose identity differs would map the position onto other samples."""
    if cfg.sources:
        data = {
            "stores": [TokenStore(u, cfg.cache_mb).identity for u in cfg.sources],
            "weights": list(cfg.weights),
        }
    elif cfg.source != "mqar" and is_store(cfg.source):
        data = {"store": TokenStore(cfg.source, cfg.cache_mb).identity}
    else:
        keys: tuple[str, ...] = ("source", "format", "text_field", "tokenizer", "eos_token")
        keys += ("mqar_pairs", "mqar_samples") if cfg.source == "mqar" else ("val_fraction",)
        data = {k: getattr(cfg, k) for k in keys}
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    return {
        "data": digest,
        "max_documents": cfg.max_documents,
        "seq_len": cfg.seq_len,
        "seed": cfg.seed,
        "shuffle": cfg.shuffle,
        "order": ORDER if cfg.shuffle else "sequential",
    }


def check_data(cfg: DataConfig, vocab_size: int, dp: int, training: bool = True) -> None:
    """What a job checks before it starts: the data loads and fits the model, and holds the
    validation sequences and (when `training`) one global batch (dp x data.batch_size
    sequences) of training sequences. A store or a mixture: manifests, tokenizer and shard
    sizes, no token read. A raw source: the tokenizer loads and fits, the source reads and
    parses, reading only as many documents as that takes (tokenising the validation
    documents and the first training ones; the rest are only hashed)."""
    if cfg.source == "mqar" or cfg.sources or is_store(cfg.source):
        train, _ = build_datasets(cfg, vocab_size)
        if training:
            build_loader(cfg, train, 0, dp)
        return
    tokenizer = fitting_tokenizer(cfg, vocab_size)
    need = dp * cfg.batch_size * cfg.seq_len + 1 if training else 0
    have = held = 0  # tokens of training and of validation documents (with their EOS)
    for doc, validation in split_documents(cfg):
        if validation and held < cfg.val_tokens:
            held += len(tokenizer.encode(doc)) + 1
        elif not validation and have < need:
            have += len(tokenizer.encode(doc)) + 1
        if held >= cfg.val_tokens and have >= need:
            break
    name = f"data.source {cfg.source!r}"
    if held < cfg.val_tokens:
        raise _too_little_validation(cfg, name, held, _raise_val_fraction(cfg))
    if have < need:
        raise ValueError(
            f"{name} holds {have} tokens of training documents, fewer than the "
            f"{need} that one global batch of dp ({dp}) x data.batch_size "
            f"({cfg.batch_size}) sequences of data.seq_len ({cfg.seq_len}) tokens needs"
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
            f"the training set has {len(dataset)} sequences of data.seq_len + 1 = "
            f"{cfg.seq_len + 1} tokens, fewer than one step needs: "
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
