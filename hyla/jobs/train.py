"""`hyla train`, `hyla resume` and `hyla sync` on the command line; what they run lives in
hyla.jobs.training_job, imported when a command runs (building the parser imports no torch)."""

from __future__ import annotations

import argparse
import math
from typing import Any


def add_commands(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train",
        help="train on Ray (embedded local Ray unless RAY_ADDRESS / cluster.address is set)",
        description="Overrides are hydra-style, e.g. model=gdn-1.3b parallel=sp4 trainer.steps=100",
    )
    train.add_argument("overrides", nargs="*", help="config overrides, key=value")
    train.set_defaults(func=_train)
    resume = commands.add_parser(
        "resume", help="continue a run from its newest complete checkpoint"
    )
    resume.add_argument("run", help="the run's name (tracking.run_name)")
    resume.add_argument(
        "overrides", nargs="*", help="changes to the run's saved config, e.g. trainer.steps=200"
    )
    resume.add_argument(
        "--storage", default=None, help="checkpoint.dir of the run (default: configs' default)"
    )
    resume.set_defaults(func=_resume)
    sync = commands.add_parser(
        "sync", help="send what a run tracked while its MLflow store was unreachable"
    )
    sync.add_argument("run", help="the run's name (tracking.run_name)")
    sync.add_argument(
        "--storage", default=None, help="checkpoint.dir of the run (default: configs' default)"
    )
    sync.set_defaults(func=_sync)


def _train(args: argparse.Namespace) -> int:
    from hyla.jobs.training_job import train_job
    from hyla.platform.config import compose

    return _print_summary(train_job(compose(args.overrides)))


def _resume(args: argparse.Namespace) -> int:
    from hyla.jobs.training_job import resume_config, train_job

    return _print_summary(train_job(resume_config(args.run, args.overrides, args.storage)))


def _sync(args: argparse.Namespace) -> int:
    from hyla.jobs.training_job import sync_run

    return sync_run(args.run, args.storage)


def _mlflow_hint(uri: str, run_id: str | None) -> str:
    """How to look at the run: a server's page, or the `mlflow ui` command for a local store."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/runs/{run_id}" if run_id else uri
    return f"mlflow ui --backend-store-uri {uri}"


def _val_loss_text(val_loss: float) -> str:
    return "not evaluated (trainer.eval_batches=0)" if math.isnan(val_loss) else f"{val_loss:.4f}"


def _print_summary(summary: dict[str, Any]) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"hyla run {summary['run_name']}", show_header=False)
    rows = [
        ("final loss", f"{summary['final_loss']:.4f}"),
        ("validation loss", _val_loss_text(summary["val_loss"])),
        ("tokens/s", f"{summary['tokens_per_second']:,.0f}"),
        ("checkpoints", summary["checkpoint_url"]),
        ("MLflow run id", str(summary["run_id"])),
        ("MLflow", _mlflow_hint(summary["tracking_uri"], summary["run_id"])),
        ("console log", summary.get("console_log", "")),
    ]
    if summary.get("resumed_from") is not None:
        rows.insert(0, ("resumed from step", str(summary["resumed_from"])))
    for row in rows:
        table.add_row(*row)
    Console(width=140).print(table)
    return 0
