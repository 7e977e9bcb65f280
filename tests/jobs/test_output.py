"""The console of a job: what it shows, and that its log file keeps everything."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from hyla.jobs.output import shown
from tests.jobs.test_train import SMALL

LINES = [  # (line as it reaches the driver, shown on the console)
    ("(RayTrainWorker pid=13430) step 4/4  loss 5.1519  236 tok/s  ETA 0s", True),
    ("(RayTrainWorker pid=7) the checkpoint of step 6 records no data position", True),
    ("(RayTrainWorker pid=7) ValueError: data.source file x.jsonl line 3: not JSON", True),
    ("(TrainController pid=13118) Requesting resources: {'CPU': 1} * 2", False),
    ("(PlacementGroupCleaner pid=16392)     actor_state = get_actor(actor_id)", False),
    ("(raylet) Raylet is terminated. Termination is unexpected.", False),
    ("(RayTrainWorker pid=13430) 2026/12/02 03:30:43 INFO mlflow.system_metrics: Started", False),
    (
        "(RayTrainWorker pid=1) /v/lib/python3.11/site-packages/torchdata/x.py:379: "
        "UserWarning: 'set_vital' is deprecated, please do not call",
        False,
    ),
    ("2026-12-02 03:28:33,027\tINFO worker.py:2029 -- Started a local Ray instance.", False),
    ("2026/12/02 03:28:12 INFO mlflow.store.db.utils: Creating initial MLflow tables", False),
    (
        "2026-12-02 03:28:16,473\tWARNING authentication_token_setup.py:85 -- Token "
        "authentication is enabled for this Ray cluster.",
        False,
    ),
    ("the worker group failed (worker died); restart 1 of 3, from the newest checkpoint", True),
    ("2026-12-02 03:28:16,473\tWARNING worker.py:1 -- a warning that may matter", True),
    (
        "[2026-12-07 04:48:25,882 E 18496 18496] core_worker.cc:2465: Actor with class name: "
        "'MapWorker(MapBatches(_ShardWriter))' and ID: 'e14d' has constructor arguments in "
        "the object store and max_restarts > 0.",
        False,
    ),
    ("[2026-12-07 04:48:25,882 E 1 1] core_worker.cc:7: another actor error", True),
    ("hyla: /tmp/store: 3/4 shards, 23.9/31.5 MB of source, 4.2 MB/s", True),
]


@pytest.mark.parametrize(("line", "expected"), LINES)
def test_the_console_shows_workers_and_hyla_and_hides_library_chatter(line, expected):
    assert shown(line, after_library_warning=False) is expected


def test_the_source_line_a_library_warning_quotes_is_hidden_too():
    quoted = "(RayTrainWorker pid=1)   torch.set_vital('Dataloader', 'enabled', 'True')"
    assert not shown(quoted, after_library_warning=True)
    assert shown("(RayTrainWorker pid=1) step 2/4  loss 5.0", after_library_warning=True)


def test_routed_output_logs_everything_and_shows_what_matters(tmp_path):
    """In a process of its own (file descriptors 1 and 2 are what is routed): Python prints,
    raw writes to fd 2, and a child process's output all reach the log file."""
    log = tmp_path / "run" / "console.log"
    script = textwrap.dedent(
        f"""
        import os, subprocess, sys
        from pathlib import Path
        from hyla.jobs.output import routed_output
        with routed_output(Path({str(log)!r})):
            print("(RayTrainWorker pid=1) step 1/2  loss 5.0")
            print("(TrainController pid=2) Requesting resources")
            os.write(2, b"written to fd 2 by C code\\n")
            subprocess.run(["echo", "(raylet) from a child process"], check=True)
            sys.stderr.write("\\rDownloading artifacts:  20%|##  | 1/5\\n")
        print("after the job")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.splitlines() == [
        "(RayTrainWorker pid=1) step 1/2  loss 5.0",
        "written to fd 2 by C code",
        "after the job",
    ]
    kept = log.read_text()
    for line in ("step 1/2", "Requesting resources", "by C code", "(raylet) from a child"):
        assert line in kept


def test_hyla_train_console_is_steps_and_summary_and_the_log_has_the_rest(tmp_path):
    """The real command in a process of its own, on an embedded Ray (sp = 2 workers)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hyla.jobs.cli",
            "train",
            *SMALL,
            "trainer.steps=2",
            "trainer.log_every=1",
            f"checkpoint.dir={tmp_path}/store",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            "tracking.run_name=quiet",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    console = result.stdout + result.stderr
    assert "step 2/2" in console and "final loss" in console and "console log" in console
    for noise in ("TrainController", "set_vital", "INFO mlflow", "Started a local Ray"):
        assert noise not in console
    kept = (tmp_path / "store" / "quiet" / "console.log").read_text()
    assert "TrainController" in kept and "step 2/2" in kept
