"""`hyla data prepare`: a raw source tokenised once into a token store, on Ray Data (the
embedded local Ray unless RAY_ADDRESS / cluster.address names a cluster, as for `hyla
train`). It takes `hyla train`'s data.* keys and overrides; train on the store with
data.source=<the store's URL>."""

from __future__ import annotations

import argparse


def add_commands(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="prepare token stores")
    verbs = data.add_subparsers(dest="verb", required=True)
    prepare = verbs.add_parser(
        "prepare",
        help="tokenise data.source once into a token store (resumes a half-written one)",
        description="e.g. hyla data prepare --out s3://bucket/corpus "
        "data.source='s3://raw/*.jsonl' data.tokenizer=tok.json data.eos_token='</s>'",
    )
    prepare.add_argument("--out", required=True, help="the store's fsspec URL")
    prepare.add_argument("overrides", nargs="*", help="config overrides, key=value (data.*)")
    prepare.set_defaults(func=_prepare)


def _prepare(args: argparse.Namespace) -> int:
    import os
    import tempfile
    import time
    from pathlib import Path

    from hyla.jobs.embedded import ray_connection
    from hyla.jobs.output import ProgressLines, routed_output
    from hyla.jobs.training_job import prepared
    from hyla.platform.config import compose
    from hyla.platform.data import prepare

    cfg = prepared(compose(args.overrides))
    if cfg.data.source == "mqar" or cfg.data.sources:
        raise ValueError(
            f"hyla data prepare needs a raw data.source (files, or stdlib), got "
            f"{cfg.data.source!r}{' with data.sources' if cfg.data.sources else ''}"
        )
    out = args.out if "://" in args.out else _absolute_path(args.out)
    start = time.perf_counter()
    # Ray's own lines go to a log file, the console gets hyla's progress (as for `hyla train`)
    log_file = (
        Path(tempfile.gettempdir())
        / "hyla"
        / f"prepare-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    )
    manifest: dict = {}  # the log is kept for a store made; bad input leaves nothing behind
    with routed_output(log_file, keep=lambda: bool(manifest)), ray_connection(cfg):
        manifest = prepare(cfg.data, out, cfg.data.prepare_workers, ProgressLines(out))
    seconds = time.perf_counter() - start
    source_mb = sum(f["size"] for f in manifest["files"]) / 1e6
    held = manifest["validation"]
    print(
        f"hyla: token store {out}: {manifest['num_tokens']:,} tokens, "
        f"{manifest['num_documents']:,} documents in {len(manifest['shards'])} shards, "
        f"{held['documents']:,} of them ({held['tokens']:,} tokens) held out for validation "
        f"({source_mb:,.1f} MB of source, {seconds:.1f} s); train on it with "
        f"data.source={out} (Ray's output: {log_file})"
    )
    return 0


def _absolute_path(path: str) -> str:
    import os

    return os.path.abspath(path)
