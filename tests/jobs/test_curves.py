"""benchmarks/curves.py: three tiny real trainings on the stdlib corpus, logged to a real
SQLite MLflow store, summarised in JSON and drawn into a PNG."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import matplotlib.image
import pytest
import torch
from mlflow import MlflowClient

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "curves.py"


@pytest.fixture(scope="module")
def curves():
    spec = importlib.util.spec_from_file_location("curves", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_curves_train_log_and_plot(curves, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out, png = tmp_path / "curves.json", tmp_path / "curves.png"
    small = ["--d-model", "32", "--seq-len", "32", "--batch", "2", "--val-sequences", "4"]
    small += ["--threads", str(torch.get_num_threads())]  # leave this process's setting alone
    small += ["--steps", "4", "--eval-every", "2", "--override", "data.max_documents=200"]
    small += ["--override", "optim.warmup_steps=2"]  # the default 10 outlasts 4 steps
    curves.main([*small, "--tracking-uri", uri, "--out", str(out), "--png", str(png)])
    summary = json.loads(out.read_text())
    assert summary["meta"]["tracking_uri"] == uri
    runs = {r["name"]: r for r in summary["runs"]}
    assert {n: r["layers"] for n, r in runs.items()} == curves.MODELS
    client = MlflowClient(uri)
    for run in runs.values():
        assert [s for s, _ in run["loss"]] == [1, 2, 3, 4]
        assert [s for s, _ in run["val_loss"]] == [2, 4]
        assert run["final_val_loss"] == run["val_loss"][-1][1] < 6.0  # ln(258) = 5.55 at start
        stored = client.get_run(run["run_id"])
        assert stored.info.status == "FINISHED"
        assert stored.data.params["model.layers"] == run["layers"]
        assert stored.data.metrics["loss"] == run["final_loss"]
    counts = [r["parameters"] for r in runs.values()]
    assert max(counts) <= 1.1 * min(counts)
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 0.01

    redrawn = tmp_path / "redrawn.png"
    curves.main(["--replot", "--out", str(out), "--png", str(redrawn)])
    assert (matplotlib.image.imread(redrawn) == image).all()  # the same figure from the JSON


def test_bad_model_lists_and_unmatched_sizes_are_rejected(curves, tmp_path):
    assert curves.parse_models(["a=GGGA", "b=AAAA"]) == {"a": "GGGA", "b": "AAAA"}
    for bad in (["GGGA"], ["a="], ["a=GGGA", "a=AAAA"]):
        with pytest.raises(ValueError, match="--models items must be distinct NAME=LAYERS"):
            curves.parse_models(bad)
    curves.check_matched({"a": 100, "b": 110}, 0.1)
    with pytest.raises(ValueError, match=r"parameter counts must agree within --tolerance=0\.1"):
        curves.check_matched({"a": 100, "b": 111}, 0.1)
    with pytest.raises(ValueError, match="parameter counts must agree"):
        curves.main(["--models", "big=LGDMA", "small=L", "--out", str(tmp_path / "x.json")])
