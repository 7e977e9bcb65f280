"""After training, through the `hyla` command on a real embedded Ray: the final model logged
and registered with its run, `hyla eval` equal to the trainer's own validation loss and
logged at the checkpoint's step, `hyla generate` and `hyla export --register`."""

from __future__ import annotations

import json
import math

import pytest
from mlflow import MlflowClient

from hyla.jobs.cli import main
from hyla.models import HybridLM
from hyla.platform.data import ByteTokenizer
from hyla.platform.registry import STEP_TAG
from hyla.platform.run_outputs import find_checkpoint, generate_text, load_model
from tests.jobs.test_train import SMALL

PROMPT = "import "


def test_a_trained_run_is_registered_evaluated_generated_from_and_exported(
    tmp_path, capsys, monkeypatch
):
    """sp = 2 training (the default parallel config); eval at the same dp x sp reads the same
    validation batch through the same code, so its loss equals the trainer's (a float sum in
    the same order: exact up to printing; 1e-6 relative allows for nothing else)."""
    monkeypatch.chdir(tmp_path)
    store = ["--storage", "store"]
    settings = [*SMALL, "checkpoint.dir=store", "tracking.uri=sqlite:///mlflow.db"]
    assert (
        main(
            [
                "train",
                *settings,
                "tracking.run_name=used",
                "trainer.steps=4",
                "tracking.log_model=true",
                "tracking.register_model=used-lm",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "store/used/summary.json").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (version,) = client.search_model_versions("name='used-lm'")
    assert version.run_id == summary["run_id"] and version.tags[STEP_TAG] == "4"

    capsys.readouterr()
    assert main(["eval", "used", *store, "--batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "eval_bits_per_byte" in out and f"MLflow run {summary['run_id']}" in out
    (point,) = client.get_metric_history(summary["run_id"], "eval_loss")
    assert point.step == 4 and point.value == pytest.approx(summary["val_loss"], rel=1e-6)
    (bpb,) = client.get_metric_history(summary["run_id"], "eval_bits_per_byte")
    assert 0 < bpb.value < 8.5  # nats / ln 2 per byte: near 8 bits before learning much
    # on a file of its own, every document of it held out (none is left to train on)
    docs = [json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * 3}) for i in range(20)]
    (tmp_path / "other.jsonl").write_text("\n".join(docs) + "\n")
    other = ["data.source=other.jsonl", "data.val_fraction=1", "data.val_sequences=2"]
    assert main(["eval", "used", *store, "--batches", "1", *other]) == 0
    assert "eval_loss" in capsys.readouterr().out
    first, second = client.get_metric_history(summary["run_id"], "eval_loss")
    assert second.step == 4 and math.isfinite(second.value) and second.value != first.value

    assert main(["generate", "used", *store, "--prompt", PROMPT, "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    model = load_model(find_checkpoint("used", "store"))
    assert captured.out == PROMPT + generate_text(model, ByteTokenizer(), PROMPT, 12) + "\n"
    assert "tokens/s" in captured.err

    assert main(["export", "used", *store, "--out", "exported", "--register", "again"]) == 0
    assert "registered as 'again' version 1" in capsys.readouterr().out
    (again,) = client.search_model_versions("name='again'")
    assert again.run_id == summary["run_id"]
    assert HybridLM.from_pretrained("exported").cfg == model.cfg
    # bad input ends on one line: an export folder that is not empty, an unknown run
    assert main(["export", "used", *store, "--out", "exported"]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert main(["generate", "nope", *store, "--prompt", "x"]) == 2
    assert "hyla: error: no run named 'nope'" in capsys.readouterr().err
