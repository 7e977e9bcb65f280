"""The data pipeline: sources, packing, sharding, exact mid-epoch resume, MQAR."""

from __future__ import annotations

import json
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hyla.platform.data import (
    MQAR,
    ByteTokenizer,
    DataConfig,
    PackedSequences,
    build_dataset,
    build_datasets,
    build_loader,
    check_data,
    held_out,
    load_tokenizer,
    read_documents,
    token_streams,
)

DOCS = [f"document {i}: " + "abcdefghij" * (i + 1) for i in range(12)]


@pytest.fixture
def memory_dir():
    """A fresh folder on fsspec's in-memory filesystem holding DOCS in three formats."""
    root = f"memory://hyla-test-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    for i, doc in enumerate(DOCS[:4]):
        fs.pipe(f"{root}/text/{i:02d}.txt", doc.encode())
    fs.pipe(
        f"{root}/jsonl/a.jsonl",
        "\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS[4:8])).encode(),
    )
    with fs.open(f"{root}/parquet/a.parquet", "wb") as f:
        pq.write_table(pa.table({"text": DOCS[8:]}), f)
    yield root
    fs.rm(root, recursive=True)


@pytest.mark.parametrize(
    "sub,pattern,expected",
    [
        ("text", "*.txt", DOCS[:4]),
        ("jsonl", "*.jsonl", DOCS[4:8]),
        ("parquet", "*.parquet", DOCS[8:]),
    ],
)
def test_formats(memory_dir, sub, pattern, expected):
    cfg = DataConfig(source=f"{memory_dir}/{sub}/{pattern}")
    assert list(read_documents(cfg)) == expected


def test_packing_reproduces_the_stream(memory_dir):
    cfg = DataConfig(source=f"{memory_dir}/text/*.txt", seq_len=16, val_fraction=0.25)
    assert [held_out(d, 0.25) for d in DOCS[:4]] == [False, False, True, False]
    stream, validation = token_streams(cfg, ByteTokenizer())
    want = np.array([b for d in DOCS[:4] for b in [*d.encode(), 256]], dtype=np.int32)
    cut = len(DOCS[0]) + len(DOCS[1]) + 2  # where document 2 begins
    assert np.array_equal(validation, want[cut : cut + len(DOCS[2]) + 1])
    assert np.array_equal(stream, np.concatenate([want[:cut], want[cut + len(DOCS[2]) + 1 :]]))
    ds = PackedSequences(stream, 16)
    assert len(ds) == (len(stream) - 1) // 16
    joined = torch.cat(
        [ds[i]["input_ids"] for i in range(len(ds))] + [ds[len(ds) - 1]["labels"][-1:]]
    )
    assert torch.equal(joined, torch.from_numpy(stream[: len(joined)]).long())
    assert torch.equal(ds[3]["labels"][:-1], ds[3]["input_ids"][1:])


def test_stdlib_corpus_by_default():
    cfg = DataConfig(max_documents=3, seq_len=64)
    ds = build_dataset(cfg, vocab_size=258)
    assert len(ds) > 10 and ds[0]["input_ids"].max() < 258


def _first_ids(loader, batches: int) -> list[int]:
    """Sequence ids (the stream numbers sequence i from 10 i) of the first batches."""
    it = iter(loader)
    return [int(x) // 10 for _ in range(batches) for x in next(it)["input_ids"][:, 0]]


def test_dp_shards_are_disjoint_and_cover():
    """One epoch of 100 sequences in steps of 4 ranks x 5: every sequence once."""
    ds = PackedSequences(np.arange(1001, dtype=np.int32), 10)  # sequence i starts with 10 i
    cfg = DataConfig(seq_len=10, batch_size=5, seed=3)
    seen = [i for rank in range(4) for i in _first_ids(build_loader(cfg, ds, rank, 4), 5)]
    assert sorted(seen) == list(range(100))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_resumes_from_the_samples_consumed(workers: int):
    """Rebuilt at stream position 7 steps in, a loader reads what the first one reads next,
    across the epoch boundary (200 sequences, 6 per step)."""
    ds = PackedSequences(np.arange(2001, dtype=np.int32), 10)
    cfg = DataConfig(seq_len=10, batch_size=3, seed=1, num_workers=workers)
    whole = _first_ids(build_loader(cfg, ds, 1, 2), 40)
    resumed = _first_ids(build_loader(cfg, ds, 1, 2, start=7 * 6), 33)
    assert resumed == whole[7 * 3 :]


def test_mqar_structure():
    ds = MQAR(seq_len=80, pairs=8, samples=10, vocab_size=258, seed=0)
    sample = ds[4]
    ids, labels = sample["input_ids"], sample["labels"]
    keys, values = ids[0:16:2], ids[1:16:2]
    assert len(set(keys.tolist())) == 8 and (keys < values.min()).all()
    table = dict(zip(keys.tolist(), values.tolist(), strict=True))
    targets = (labels != -100).nonzero().flatten()
    assert len(targets) == 8
    for pos in targets.tolist():
        assert labels[pos].item() == table[ids[pos].item()]  # the value of the key just seen
    assert torch.equal(ds[4]["input_ids"], ids)  # a function of (seed, index)
    assert not torch.equal(ds[5]["input_ids"], ids)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(seq_len=0), r"data.seq_len must be an integer >= 1, got 0"),
        (dict(batch_size=-1), r"data.batch_size must be an integer >= 1, got -1"),
        (
            dict(format="csv"),
            r"data.format must be one of \('auto', 'text', 'jsonl', 'parquet'\), "
            r"got 'csv'",
        ),
        (dict(num_workers=-2), r"data.num_workers must be >= 0, got -2"),
        (dict(val_fraction=0.0), r"data.val_fraction must be in \(0, 1\], got 0.0"),
        (dict(val_fraction=float("nan")), r"data.val_fraction must be in \(0, 1\], got nan"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**kwargs)


def test_bad_sources(memory_dir):
    with pytest.raises(
        ValueError, match=r"data.source matched no files: 'memory://nowhere/\*.txt'"
    ):
        list(read_documents(DataConfig(source="memory://nowhere/*.txt")))
    bad = DataConfig(source=f"{memory_dir}/jsonl/*.jsonl", text_field="body")
    with pytest.raises(
        ValueError,
        match=r"data.text_field 'body' is missing in .*a.jsonl line 1; "
        r"keys there: \['id', 'text'\]",
    ):
        list(read_documents(bad))
    with pytest.raises(
        ValueError,
        match=r"data.source .*00.txt' holds 0 tokens of validation documents, fewer than the "
        r"32769 that data.val_sequences \(8\) sequences of data.seq_len \(4096\) tokens "
        r"need; lower data.val_sequences, or raise data.val_fraction \(0.005\)",
    ):
        build_dataset(DataConfig(source=f"{memory_dir}/text/00.txt", seq_len=4096), 258)
    # every document held out: a source to evaluate on, refused for training
    one = DataConfig(
        source=f"{memory_dir}/text/00.txt", val_fraction=1.0, seq_len=4, val_sequences=1
    )
    train, val = build_datasets(one, 258)
    assert (len(train), len(val)) == (0, 1)
    check_data(one, 258, dp=1, training=False)
    with pytest.raises(ValueError, match=r"training set has 0 sequences of data.seq_len \+ 1"):
        build_loader(one, train, 0, 1)
    with pytest.raises(ValueError, match=r"holds 0 tokens of training documents, fewer than"):
        check_data(one, 258, dp=1)
    with pytest.raises(
        ValueError,
        match=r"model.vocab_size must be >= 258 for the tokenizer data.tokenizer='bytes'",
    ):
        build_dataset(DataConfig(source=f"{memory_dir}/text/*.txt"), 100)
    with pytest.raises(ValueError, match=r"data.seq_len must be >= 4 \* data.mqar_pairs = 64"):
        build_dataset(DataConfig(source="mqar", seq_len=32), 258)
    small = PackedSequences(np.arange(31, dtype=np.int32), 10)  # 3 sequences
    with pytest.raises(ValueError, match=r"fewer than one step needs: dp \(2\) x data.batch_size"):
        build_loader(DataConfig(seq_len=10, batch_size=2), small, 0, 2)


def test_validation_split_is_held_out_and_doc_start_marks_documents(memory_dir):
    """Validation sequences come from the held-out document (DOCS[2] at 0.25), training
    sequences from the others; doc_start marks each document's first token in both."""
    cfg = DataConfig(
        source=f"{memory_dir}/text/*.txt",
        seq_len=8,
        val_sequences=3,
        val_fraction=0.25,
        document_masking=True,
    )
    streams = [torch.from_numpy(s.astype(np.int64)) for s in token_streams(cfg, ByteTokenizer())]
    train, val = build_datasets(cfg, 258)
    assert len(val) == 3 and len(train) == (len(streams[0]) - 1) // 8
    assert bytes(val[0]["input_ids"].tolist()) == DOCS[2].encode()[:8]
    trained = b"".join(
        bytes([t for t in train[i]["input_ids"].tolist() if t < 256]) for i in range(len(train))
    )
    assert DOCS[2].encode() not in trained and DOCS[3].encode()[:40] in trained
    for ds, stream in zip((train, val), streams, strict=True):
        for i in range(len(ds)):
            sample = ds[i]
            begin = i * 8
            want = torch.ones(8, dtype=torch.bool)  # the stream's first token starts a document
            if begin:
                want = stream[begin - 1 : begin + 7] == ByteTokenizer.eos_id
            else:
                want[1:] = sample["input_ids"][:-1] == ByteTokenizer.eos_id
            assert torch.equal(sample["doc_start"], want)
    plain = DataConfig(source=cfg.source, seq_len=8, val_sequences=3, val_fraction=0.25)
    assert "doc_start" not in build_datasets(plain, 258)[0][0]
    mqar_train, mqar_val = build_datasets(
        DataConfig(source="mqar", seq_len=64, val_sequences=4), 258
    )
    assert len(mqar_val) == 4
    assert not torch.equal(mqar_train[0]["input_ids"], mqar_val[0]["input_ids"])


def test_tokenizers_json(memory_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for d in DOCS[:4] for w in d.split()})
    vocab = {"<unk>": 0, "</s>": 1} | {w: i + 2 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "tok.json"
    tok.save(str(path))
    cfg = DataConfig(
        source=f"{memory_dir}/text/*.txt",
        tokenizer=str(path),
        eos_token="</s>",
        seq_len=4,
        val_sequences=1,
        val_fraction=0.4,  # documents 2 and 3
    )
    want: tuple[list[int], list[int]] = ([], [])
    for i, doc in enumerate(DOCS[:4]):
        want[i >= 2].extend([vocab[w] for w in doc.split()] + [1])
    assert [s.tolist() for s in token_streams(cfg, load_tokenizer(cfg))] == list(want)
    with pytest.raises(
        ValueError, match=rf"model.vocab_size must be >= {len(vocab)} .*got {len(vocab) - 1}"
    ):
        build_datasets(cfg, len(vocab) - 1)
    with pytest.raises(ValueError, match=r"data.eos_token must name a token .* got '<eos>'"):
        build_datasets(DataConfig(source=cfg.source, tokenizer=str(path), eos_token="<eos>"), 99)
    with pytest.raises(ValueError, match=r"data.tokenizer .*missing.json' is not a readable"):
        build_datasets(DataConfig(source=cfg.source, tokenizer=str(tmp_path / "missing.json")), 9)
