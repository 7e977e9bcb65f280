"""The data layer at scale: preparing a corpus into a token store, and what a training rank
pays to start from it.

For each corpus size (jsonl built from the standard library's source files, repeated), with
a 16,384-token BPE trained by `tokenizers` on its first 8 MB:

- tokenizer: `encode_batch` over the corpus on one thread and on every core (the ceiling of
  this machine for preparing), the median of 3 runs;
- prepare: `hyla.platform.data.prepare` at 1 and 2 Ray Data workers (MB/s of source,
  tokens/s), on a local Ray of 2 CPUs, with the default data.shard_bytes; 1 and 2 workers
  in turn, 3 times each, the median reported (every time kept in the JSON);
- rank start: in a fresh process, the time from nothing to the first batch of a loader over
  the store, and that process's peak memory (its own VmHWM), the median of 3 processes; the
  same from the raw source read in memory (what every rank did before token stores, once),
  for comparison;
- loader: tokens/s of that loader at the tiny preset's data.seq_len (512, batch 4) and at
  the scale-1m experiment's (1,048,576, batch 1), to set against what training consumes.

Sizes above --full-up-to MB skip what grows slowest to measure (the tokenizer's own rates,
prepare on one worker and the raw baseline, each several minutes per 100 MB here); sizes up
to --scaling-up-to MB still run prepare on one worker, once, for the scaling of 2 workers
over 1 where the shards are many.

    .venv/bin/python benchmarks/data.py --sizes 50 1000     # MB; ~15 minutes on 2 cores

Writes benchmarks/results/data.json (--out) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 3  # runs of each rate measured in full (the median is reported)

# The peak is VmHWM, the high-water mark of this process's own memory since it exec'd:
# ru_maxrss would also count the benchmark's memory at the fork (Linux keeps the larger).
RANK_START = """
import json, sys, time
start = time.perf_counter()
from hyla.platform.data import DataConfig, build_datasets, build_loader
cfg = DataConfig(**json.loads(sys.argv[1]))
train, _ = build_datasets(cfg, 16384)
batches = iter(build_loader(cfg, train, 0, 1))
next(batches)
first = time.perf_counter() - start
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 2**20
steps = max(1, 2**20 // (cfg.seq_len * cfg.batch_size)) * 8
t = time.perf_counter()
for _ in range(steps):
    next(batches)
rate = steps * cfg.batch_size * cfg.seq_len / (time.perf_counter() - t)
print(json.dumps({"first_batch_s": first, "peak_gib": peak, "tokens_per_s": rate}))
"""

ENCODE = """
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
docs = [json.loads(line)["text"] for p in sys.argv[2:] for line in open(p)]
t = time.perf_counter()
for i in range(0, len(docs), 256):
    tok.encode_batch(docs[i : i + 256])
print(time.perf_counter() - t)
"""


def build_corpus(folder: Path, megabytes: int) -> list[Path]:
    """jsonl files of 32 MB each, one document per standard-library file, repeated."""
    from hyla.platform.data import stdlib_files

    texts = [Path(p).read_text(errors="replace") for p in stdlib_files()]
    folder.mkdir(parents=True)
    files, written, i = [], 0, 0
    while written < megabytes << 20:
        path = folder / f"part-{len(files):04d}.jsonl"
        with path.open("w") as f:
            size = 0
            while size < 32 << 20 and written + size < megabytes << 20:
                line = json.dumps({"text": texts[i % len(texts)]}) + "\n"
                f.write(line)
                size += len(line)
                i += 1
        files.append(path)
        written += size
    return files


def train_bpe(files: list[Path], out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def sample():
        seen = 0
        with files[0].open() as f:
            for line in f:
                seen += len(line)
                if seen > 8 << 20:
                    return
                yield json.loads(line)["text"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=16384, special_tokens=["</s>"])
    tok.train_from_iterator(sample(), trainer)
    tok.save(str(out))


def run(code: str, *args: str, threads: int | None = None) -> str:
    env = dict(os.environ)
    if threads is not None:
        env["RAYON_NUM_THREADS"] = str(threads)
    result = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, check=True, capture_output=True, text=True
    )
    return result.stdout.strip().splitlines()[-1]


def rank_start(keys: dict, repeats: int = REPEATS) -> dict:
    """RANK_START in `repeats` fresh processes: the median of each measurement."""
    runs = [json.loads(run(RANK_START, json.dumps(keys))) for _ in range(repeats)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def measure(size_mb: int, work: Path, full: bool, scaling: bool) -> dict:
    import ray

    from hyla.platform.data import DataConfig, prepare

    files = build_corpus(work / f"corpus-{size_mb}", size_mb)
    source_mb = sum(f.stat().st_size for f in files) / 1e6
    tokenizer = work / f"bpe-{size_mb}.json"
    train_bpe(files, tokenizer)
    row: dict = {"size_mb": round(source_mb, 1)}
    for threads, key in ((1, "encode_1_thread"), (os.cpu_count(), "encode_all_cores")):
        if full:
            times = [
                float(run(ENCODE, str(tokenizer), *map(str, files), threads=threads))
                for _ in range(REPEATS)
            ]
            row[f"{key}_mb_s"] = source_mb / statistics.median(times)
    keys = {
        "source": str(work / f"corpus-{size_mb}" / "*.jsonl"),
        "tokenizer": str(tokenizer),
        "eos_token": "</s>",
        # a tenth held out: validation documents enough for one 1M-token sequence at 50 MB
        "val_fraction": 0.1,
    }
    ray.init(num_cpus=2, include_dashboard=False, address="local")
    try:
        # 1 and 2 workers in turn, REPEATS times each at sizes measured in full (the median),
        # once each at sizes up to --scaling-up-to, else 2 workers once
        times: dict[int, list[float]] = {1: [], 2: []}
        for workers in [1, 2] * REPEATS if full else [1, 2] if scaling else [2]:
            out = work / f"store-{size_mb}-{workers}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            manifest = prepare(DataConfig(**keys), str(out), workers=workers)
            times[workers].append(time.perf_counter() - start)
        for workers, seconds in times.items():
            if seconds:
                row[f"prepare_{workers}_workers_s"] = seconds
                row[f"prepare_{workers}_workers_mb_s"] = source_mb / statistics.median(seconds)
                median_rate = manifest["num_tokens"] / statistics.median(seconds)
                row[f"prepare_{workers}_workers_tokens_s"] = median_rate
    finally:
        ray.shutdown()
    row["tokens"] = manifest["num_tokens"]
    store = {**keys, "source": str(work / f"store-{size_mb}-2"), "seq_len": 512}
    row["store_rank"] = rank_start(store)
    long = {**store, "seq_len": 1 << 20, "batch_size": 1, "val_sequences": 1}
    if manifest["validation"]["tokens"] > 1 << 20:
        row["store_rank_1m"] = rank_start(long)
    if full:
        raw = {**keys, "seq_len": 512}
        row["raw_rank"] = rank_start(raw, repeats=1)
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("store_rank", "token store"), ("raw_rank", "raw source in memory")):
        have = [r for r in rows if key in r]
        xs = [r["size_mb"] for r in have]
        a.plot(xs, [r[key]["first_batch_s"] for r in have], "o-", label=label)
        b.plot(xs, [r[key]["peak_gib"] for r in have], "o-", label=label)
    a.set(xlabel="corpus (MB)", ylabel="seconds to the first batch", xscale="log")
    b.set(xlabel="corpus (MB)", ylabel="peak memory of the rank (GiB)", xscale="log")
    a.set_ylim(bottom=0)
    b.set_ylim(bottom=0)
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 1000], help="MB")
    parser.add_argument("--full-up-to", type=int, default=100, help="MB; see above")
    parser.add_argument(
        "--scaling-up-to", type=int, default=0, help="MB; prepare on 1 worker too, once"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/data.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hyla-data-bench-") as tmp:
        rows = [
            measure(size, Path(tmp), size <= args.full_up_to, size <= args.scaling_up_to)
            for size in args.sizes
        ]
    result = {
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(rows, args.out.with_suffix(".png"))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
