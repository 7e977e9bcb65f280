"""After training: `hyla generate`, `hyla eval` and `hyla export` on the command line. RUN is
a run's name (under --storage, default the configs' checkpoint.dir, as `hyla resume` finds
it) or the URL of one of its checkpoints; the work lives in hyla.platform.run_outputs,
hyla.jobs.evaluate and hyla.platform.registry, imported when a command runs."""

from __future__ import annotations

import argparse
import sys
import time

RUN_HELP = "the run's name (tracking.run_name), or a checkpoint URL (.../checkpoints/step-N)"
STORAGE_HELP = "checkpoint.dir of the run (default: configs' default)"


def add_commands(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser(
        "generate", help="sample text from a run's newest (or chosen) checkpoint"
    )
    _run_arguments(generate)
    generate.add_argument("--prompt", required=True, help="the text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    generate.add_argument("--seed", type=int, default=0)
    generate.set_defaults(func=_generate)

    evaluate = commands.add_parser(
        "eval",
        help="loss, perplexity and bits per byte of a checkpoint, logged to its MLflow run",
        description="Evaluates on the validation split (data.val_sequences sequences packed "
        "from the documents held out at data.val_fraction) of the run's data, or of the data "
        "named by overrides, e.g. data.source=eval.jsonl data.val_fraction=1 "
        "data.val_sequences=64 (every document of eval.jsonl); runs on Ray with the "
        "run's parallel.dp x parallel.sp unless overridden.",
    )
    _run_arguments(evaluate)
    evaluate.add_argument("overrides", nargs="*", help="data.*, parallel.*, cluster.* changes")
    evaluate.add_argument("--batches", type=int, default=8, help="validation batches to read")
    evaluate.set_defaults(func=_eval)

    export = commands.add_parser(
        "export",
        help="write a checkpoint as model.safetensors + config.json + tokenizer (no pickles)",
    )
    _run_arguments(export)
    export.add_argument("--out", required=True, help="a new (or empty) folder")
    export.add_argument(
        "--register",
        metavar="NAME",
        default=None,
        help="also log the folder to the run's MLflow run and register it under NAME",
    )
    export.set_defaults(func=_export)


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help=RUN_HELP)
    parser.add_argument("--storage", default=None, help=STORAGE_HELP)
    parser.add_argument("--step", type=int, default=None, help="default: the newest checkpoint")


def _generate(args: argparse.Namespace) -> int:
    from hyla.platform.data import load_tokenizer
    from hyla.platform.run_outputs import find_checkpoint, generate_text, load_model

    checkpoint = find_checkpoint(args.run, args.storage, args.step)
    model = load_model(checkpoint)
    tokenizer = load_tokenizer(checkpoint.cfg.data)
    print(args.prompt, end="", flush=True)
    start = time.perf_counter()
    text = generate_text(
        model,
        tokenizer,
        args.prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        on_text=lambda piece: print(piece, end="", flush=True),
    )
    seconds = time.perf_counter() - start
    tokens = len(tokenizer.encode(text))
    print()
    print(
        f"{tokens} tokens in {seconds:.2f} s ({tokens / seconds:,.1f} tokens/s), "
        f"step {checkpoint.step} of {checkpoint.url}",
        file=sys.stderr,
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from hyla.jobs.evaluate import eval_config, eval_job
    from hyla.platform.run_outputs import find_checkpoint

    checkpoint = find_checkpoint(args.run, args.storage, args.step)
    result = eval_job(checkpoint, eval_config(checkpoint, args.overrides, args.batches))
    for key, value in result.items():
        if key.startswith("eval_"):
            print(f"{key:<20} {value:.4f}")
    where = f"MLflow run {result['run_id']}" if result["run_id"] else "no MLflow run recorded"
    print(f"step {checkpoint.step} of {checkpoint.url}; logged to {where}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from hyla.platform.run_outputs import export, find_checkpoint

    checkpoint = find_checkpoint(args.run, args.storage, args.step)
    record = checkpoint.tracking() or {}
    if args.register is not None and not record.get("run_id"):
        raise ValueError(
            f"--register needs the run's MLflow run, but {checkpoint.folder} records none"
        )
    folder = export(checkpoint, args.out)
    print(f"exported step {checkpoint.step} of {checkpoint.url} to {folder}")
    if args.register is not None:
        from hyla.platform.registry import log_model

        version = log_model(
            folder,
            record["tracking_uri"],
            record["run_id"],
            checkpoint.step,
            checkpoint.url,
            register_as=args.register,
        )
        print(f"registered as {args.register!r} version {version} (MLflow run {record['run_id']})")
    return 0
