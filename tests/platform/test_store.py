"""Token stores: prepared with Ray Data (a real local Ray), read by range; the same stream
as the in-memory path, the same bytes at any number of workers, corruption refused by name,
remote stores read block by block through a bounded cache, mixtures resumed exactly."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hyla.platform.data import (
    DataConfig,
    Mixture,
    PackedSequences,
    Progress,
    TokenStore,
    build_datasets,
    build_loader,
    check_data,
    held_out,
    load_tokenizer,
    prepare,
    token_streams,
)
from tests.platform.s3_server import moto_s3_environment

DOCS = [f"doc {i}: " + "the quick brown fox jumps " * (i % 9) + "é" * (i % 3) for i in range(300)]
VAL = 0.1  # of DOCS, 33 are validation documents
HELD_FIRST = [6, 16, 25, 27, 59]  # the first five of them


@pytest.fixture(scope="module")
def local_ray():
    """A Ray instance of this module's own, two CPUs, stopped through its handle."""
    import ray

    context = ray.init(num_cpus=2, include_dashboard=False, address="local")
    yield context
    ray.shutdown()


def _write_source(root: Path, fmt: str) -> str:
    """DOCS in `fmt`, over several files; the source glob."""
    root.mkdir(parents=True)
    for f, docs in enumerate((DOCS[:120], DOCS[120:200], DOCS[200:])):
        if fmt == "text":
            for i, doc in enumerate(docs):
                (root / f"{f}-{i:03d}.txt").write_text(doc)
        elif fmt == "jsonl":
            lines = [json.dumps({"text": d}) for d in docs]
            (root / f"{f}.jsonl").write_text("\n".join(lines) + "\n")
        else:
            pq.write_table(pa.table({"text": docs}), root / f"{f}.parquet")
    return str(root / {"text": "*.txt", "jsonl": "*.jsonl", "parquet": "*.parquet"}[fmt])


def _bpe_tokenizer(path: Path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"])
    tok.train_from_iterator(DOCS, trainer)
    tok.save(str(path))
    return str(path)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
@pytest.mark.parametrize("fmt", ["text", "jsonl", "parquet"])
def test_a_store_holds_the_in_memory_stream_at_any_number_of_workers(
    local_ray, tmp_path, fmt, tokenizer
):
    source = _write_source(tmp_path / "src", fmt)
    keys = {"source": source, "shard_bytes": 2048, "val_fraction": VAL}  # jsonl cut mid-file
    if tokenizer == "bpe":
        keys |= {"tokenizer": _bpe_tokenizer(tmp_path / "bpe.json"), "eos_token": "</s>"}
    cfg = DataConfig(**keys)
    one, two = tmp_path / "one", tmp_path / "two"
    manifest = prepare(cfg, str(one), workers=1)
    prepare(cfg, str(two), workers=2)
    assert _files(one) == _files(two)  # the same bytes whatever the number of workers
    assert len(manifest["shards"]) > 2 and manifest["num_documents"] == len(DOCS)
    store = TokenStore(str(one))
    held = [d for d in DOCS if held_out(d, VAL)]
    assert manifest["validation"]["documents"] == len(held) == 33
    for part, want in zip(
        (store.part(validation=False), store.part(validation=True)),
        token_streams(cfg, load_tokenizer(cfg)),
        strict=True,
    ):
        assert np.array_equal(part.tokens(0, len(part)), want)
        # every range, also those across shards, reads as the whole stream's slice
        for begin in range(0, len(part), 97):
            end = min(begin + 150, len(part))
            assert np.array_equal(part.tokens(begin, end), want[begin:end])
        ends = np.flatnonzero(want == store.eos_id) + 1
        assert part.num_documents == len(ends)
        assert [part.documents_end(n) for n in (0, 1, 7, len(ends), 10**6)] == [
            0,
            ends[0],
            ends[6],
            ends[-1],
            ends[-1],
        ]
    assert manifest["validation"]["tokens"] == len(store.part(validation=True))
    assert manifest["dtype"] == "<u2"


def test_validation_documents_are_chosen_by_their_text_alone():
    """The held-out rule: a fixed function of the text, holding out about `fraction` of the
    documents (within 7 standard deviations of the binomial count), all of them at 1."""
    docs = [f"document {i}" for i in range(20_000)]
    for fraction in (0.005, 0.1, 0.5):
        count = sum(held_out(d, fraction) for d in docs)
        sd = (len(docs) * fraction * (1 - fraction)) ** 0.5
        assert abs(count - len(docs) * fraction) < 7 * sd
    assert all(held_out(d, 1.0) for d in docs[:100])
    assert [held_out(d, 0.1) for d in DOCS] == [held_out(str(d), 0.1) for d in DOCS]
    # a copy of a validation document is a validation document wherever it lies
    assert {
        held_out(d, VAL) for d in DOCS if d == DOCS[[held_out(x, VAL) for x in DOCS].index(True)]
    } == {True}


def test_training_samples_from_a_store_equal_those_from_the_raw_source(local_ray, tmp_path):
    """Same data.* keys, raw source in memory or the store prepared from it: every training
    and validation sample is the same (document starts and max_documents included), so
    training on either gives bit-identical losses."""
    source = _write_source(tmp_path / "src", "jsonl")
    raw = DataConfig(
        source=source,
        seq_len=16,
        val_sequences=3,
        val_fraction=VAL,
        document_masking=True,
        max_documents=250,
    )
    prepare(DataConfig(source=source, shard_bytes=4096, val_fraction=VAL), str(tmp_path / "store"))
    stored = DataConfig(**{**raw.__dict__, "source": str(tmp_path / "store")})
    for a, b in zip(build_datasets(raw, 258), build_datasets(stored, 258), strict=True):
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            sa, sb = a[i], b[i]
            assert sa.keys() == sb.keys() == {"input_ids", "labels", "doc_start"}
            assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_corrupt_missing_or_half_written_store_is_refused_by_name(local_ray, tmp_path):
    source = _write_source(tmp_path / "src", "jsonl")
    out = tmp_path / "store"
    cfg = DataConfig(source=source, shard_bytes=2048, val_fraction=VAL)
    prepare(cfg, str(out))
    shards = out / "shards"
    train = DataConfig(source=str(out), seq_len=16, val_sequences=2)
    check_data(train, 258, dp=1)

    # the same size, one byte flipped: preflight passes (sizes only), the first read refuses
    tokens = shards / "00001.tokens"
    good = tokens.read_bytes()
    tokens.write_bytes(bytes([good[0] ^ 1]) + good[1:])
    check_data(train, 258, dp=1)
    store = TokenStore(str(out))
    with pytest.raises(ValueError, match=r"shards/00001\.tokens is corrupt \(block 0 fails"):
        store.tokens(0, len(store))

    # a rerun of prepare keeps the shards that verify and writes the corrupt one again
    kept = {p.name: p.stat().st_mtime_ns for p in shards.glob("00000.*")}
    (out / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"token store .*store is half-written"):
        check_data(train, 258, dp=1)
    reports: list[Progress] = []
    manifest = prepare(cfg, str(out), progress=reports.append)
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("00000.*")} == kept
    assert tokens.read_bytes() == good
    # progress: the kept shards count as done from the start, and only the rewritten one is
    # tokenised by this call
    total = sum(f["size"] for f in manifest["files"])
    shards_n = len(manifest["shards"])
    assert (reports[0].shards_done, reports[0].bytes_written) == (shards_n - 1, 0)
    assert (reports[-1].shards_done, reports[-1].bytes_done) == (shards_n, total)
    assert len(reports) == 2 and 0 < reports[-1].bytes_written < total

    tokens.write_bytes(good[:-2])  # truncated: the preflight names it
    with pytest.raises(ValueError, match=r"00001\.tokens is corrupt .*bytes, the manifest says"):
        check_data(train, 258, dp=1)
    tokens.unlink()
    with pytest.raises(ValueError, match=r"00001\.tokens is missing"):
        check_data(train, 258, dp=1)


def test_a_store_refuses_another_tokenizer_and_a_small_vocabulary(local_ray, tmp_path):
    source = _write_source(tmp_path / "src", "text")
    bpe = _bpe_tokenizer(tmp_path / "bpe.json")
    bpe_keys = {"tokenizer": bpe, "eos_token": "</s>", "val_fraction": VAL}
    prepare(DataConfig(source=source, **bpe_keys), str(tmp_path / "s"))
    with pytest.raises(ValueError, match=r"prepared with the tokenizer .*bpe\.json.*set data"):
        check_data(DataConfig(source=str(tmp_path / "s")), 512, dp=1)
    fits = DataConfig(source=str(tmp_path / "s"), tokenizer=bpe, eos_token="</s>", seq_len=8)
    check_data(fits, 300, dp=1)
    with pytest.raises(ValueError, match=r"model.vocab_size must be >= 300 .*got 299"):
        check_data(fits, 299, dp=1)
    long = DataConfig(**{**fits.__dict__, "seq_len": 64, "val_sequences": 400})
    with pytest.raises(
        ValueError,
        match=r"holds \d+ tokens of validation documents, fewer than the 25601 that "
        r"data.val_sequences \(400\) .*prepare it again with a larger data.val_fraction "
        r"\(it was prepared with 0.1;",
    ):
        check_data(long, 300, dp=1)
    with pytest.raises(ValueError, match=r"data.val_fraction=1e-06 holds out none of the 300"):
        prepare(DataConfig(source=source, val_fraction=1e-6), str(tmp_path / "none"))
    # a store of the earlier format (no validation documents) is refused, with what to do
    manifest = tmp_path / "s" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"version": 2', '"version": 1'))
    with pytest.raises(ValueError, match=r"prepared by an earlier hyla \(format version 1"):
        check_data(fits, 300, dp=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"has no documents"):
        prepare(DataConfig(source=str(empty / "*.jsonl")), str(tmp_path / "e"))
    # a worker's input error reaches the caller as the one line it raised
    (empty / "a.jsonl").write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(ValueError, match=r"a\.jsonl line 2 column 2 is not JSON"):
        prepare(DataConfig(source=str(empty / "*.jsonl")), str(tmp_path / "e"))


def test_an_s3_store_reads_blocks_by_range_through_a_bounded_cache(
    local_ray, tmp_path, monkeypatch
):
    """A store of 3 MiB of tokens uploaded to s3 (moto): reading a few samples fetches only
    their blocks, within cache_mb, and gives the local store's tokens."""
    text = tmp_path / "src" / "big.txt"
    text.parent.mkdir()
    rng = np.random.default_rng(0)
    text.write_bytes(bytes(rng.integers(97, 123, size=3 << 20, dtype=np.uint8)))
    local = tmp_path / "store"
    prepare(DataConfig(source=str(text), val_fraction=1.0), str(local))  # its one document
    with moto_s3_environment(monkeypatch):
        fs = fsspec.filesystem("s3")
        fs.mkdir("hyla-data")
        fs.put(str(local), "hyla-data/store", recursive=True)
        remote = TokenStore("s3://hyla-data/store", cache_mb=2)
        reference = TokenStore(str(local))
        calls: list[tuple[int, int]] = []
        cat = remote._filesystem().cat_file

        def counting_cat(path, start=None, end=None, **kw):
            if path.endswith(".tokens"):
                calls.append((start, end))
            return cat(path, start=start, end=end, **kw)

        monkeypatch.setattr(remote._fs, "cat_file", counting_cat)
        # blocks of 2**20 bytes, 2**19 tokens: 0; 5; 1 and 2 (two blocks); 2 (cached); 0
        # again (dropped: the cache holds two blocks)
        for begin in (10, 3_000_000, 1_048_570, 1_048_600, 20):
            assert np.array_equal(
                remote.tokens(begin, begin + 64), reference.tokens(begin, begin + 64)
            )
        block = 1 << 20
        assert [(start // block, end - start) for start, end in calls] == [
            (b, block) for b in (0, 5, 1, 2, 0)
        ]
        assert remote._cached_bytes <= 2 << 20


def test_a_mixture_interleaves_by_weight_and_resumes_exactly_at_another_dp(local_ray, tmp_path):
    a = _write_source(tmp_path / "a", "jsonl")
    b = _write_source(tmp_path / "b", "text")
    prepare(DataConfig(source=a, val_fraction=VAL), str(tmp_path / "A"))
    prepare(DataConfig(source=b, val_fraction=VAL), str(tmp_path / "B"))
    cfg = DataConfig(
        sources=[str(tmp_path / "A"), str(tmp_path / "B")],
        weights=[3.0, 1.0],
        seq_len=16,
        batch_size=2,
        val_sequences=2,
    )
    train, _ = build_datasets(cfg, 258)
    assert isinstance(train, Mixture)
    owners = train.owner[:4000]
    assert abs((owners == 0).mean() - 0.75) < 1e-3
    parts = train.datasets
    assert isinstance(parts[0], PackedSequences)
    first_b = int(np.flatnonzero(owners == 1)[0])
    assert torch.equal(train[first_b]["input_ids"], parts[1][0]["input_ids"])

    def global_order(dp: int, accum: int, start: int, steps: int) -> list[list[int]]:
        """Each step's samples (first token ids) over every dp rank, in rank order."""
        loaders = [iter(build_loader(cfg, train, r, dp, accum, start)) for r in range(dp)]
        out = []
        for _ in range(steps):
            ids = []
            for it in loaders:
                for _ in range(accum):
                    ids += next(it)["input_ids"][:, :4].flatten().tolist()
            out.append(sorted(ids))
        return out

    whole = global_order(dp=2, accum=1, start=0, steps=6)
    assert global_order(dp=1, accum=2, start=3 * 4, steps=3) == whole[3:]


def test_training_from_the_store_gives_the_raw_sources_losses_bit_for_bit(local_ray, tmp_path):
    from hyla.platform.config import compose
    from hyla.platform.trainer import Trainer

    source = _write_source(tmp_path / "src", "jsonl")
    prepare(DataConfig(source=source, shard_bytes=4096, val_fraction=VAL), str(tmp_path / "store"))

    def losses(data_source: str, name: str) -> dict[int, float]:
        cfg = compose(
            [
                f"data.source={data_source}",
                "data.seq_len=32",
                "data.batch_size=2",
                "data.val_sequences=2",
                f"data.val_fraction={VAL}",
                "parallel=none",
                "trainer.steps=3",
                "optim.warmup_steps=1",
                "trainer.eval_batches=0",
                f"checkpoint.dir={tmp_path}/runs",
                f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                f"tracking.run_name={name}",
            ]
        )
        return Trainer(cfg).fit().losses

    assert losses(source, "raw") == losses(str(tmp_path / "store"), "stored")
