"""Outside clients of an exported model, each run as its users run it, in processes of its
own: lm-evaluation-harness's `lm_eval --model hf` on the folder, and the MLflow model
registered from it, loaded by `models:/NAME/VERSION` in a fresh interpreter and served by
`mlflow models serve` over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.request import Request, urlopen

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from hyla.evaluation_tasks import TASKS_DIR
from hyla.models import HybridLM, ModelConfig
from hyla.platform.data import ByteTokenizer
from hyla.platform.registry import log_model
from hyla.platform.run_outputs import exported_tokenizer, generate_text, write_tokenizer
from tests.platform.mlflow_server import free_port, stop_group, wait_answering

PROMPT = "def main():"
NEW_TOKENS = 8
TASKS = ("hyla_smoke_choice", "hyla_smoke_loglikelihood")
# Ceilings against a client that hangs (each test waits on its process or its answer first):
# lm_eval took 22-66 s and the server 11-33 s to answer on a loaded 2-core machine.
LM_EVAL_CEILING_S = 600
SERVE_CEILING_S = 300


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained model with every layer kind (L, G, D, MoM, attention) and the byte
    tokenizer, written as `hyla export` writes a folder."""
    folder = tmp_path_factory.mktemp("export")
    tokenizer = ByteTokenizer()
    cfg = ModelConfig(
        layers="LGDMA", d_model=32, n_heads=2, vocab_size=tokenizer.vocab_size, init_std=0.2
    )
    eos_token = write_tokenizer(tokenizer, folder)
    HybridLM(cfg).save_pretrained(
        str(folder), extra={"eos_token_id": tokenizer.eos_id, "eos_token": eos_token}
    )
    return folder


def _venv_env(**extra: str) -> dict[str, str]:
    """This environment with the interpreter's folder first on PATH, as in an activated venv:
    the console scripts `lm_eval` and `mlflow` are found there, and `mlflow models serve`
    starts `uvicorn` by name."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, **extra}


def _continuation_logprob(model: HybridLM, context: str, continuation: str) -> float:
    """hyla's log-likelihood of `continuation` after `context`: the sum of the log-probs of
    its byte tokens, from HybridLM's whole-sequence pass."""
    tokenizer = ByteTokenizer()
    ctx, cont = tokenizer.encode(context).tolist(), tokenizer.encode(continuation).tolist()
    with torch.no_grad():
        hidden, _ = model.hidden_states(torch.tensor([ctx + cont]))
        logprobs = torch.log_softmax(model.logits(hidden)[0], dim=-1)
    return logprobs[len(ctx) - 1 : -1].gather(-1, torch.tensor(cont)[:, None]).sum().item()


def _samples(output: Path, task: str) -> list[dict]:
    """The per-example records `lm_eval --log_samples` wrote for `task`."""
    (path,) = output.glob(f"*/samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lm_eval_loglikelihoods_equal_hyla_own(exported: Path, tmp_path: Path):
    """Both smoke tasks through `lm_eval --model hf` (batches of 4, right-padded by lm_eval):
    every request's log-likelihood equals hyla's sum for the same strings. The wrapper
    decodes through its cache (the fused recurrent ops) and HybridLM's whole-sequence pass
    takes the chunked ones: the same fp32 terms summed in another order, ~1e-6 relative
    per logit (measured: at most 4e-6 absolute on sums of about -30). rel=1e-5 leaves room
    for that and is still far below the gaps between choices (~0.1 and more)."""
    include = subprocess.run(
        [sys.executable, "-m", "hyla.evaluation_tasks"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert include == str(TASKS_DIR)
    hf_home = tmp_path / "hf"
    env = _venv_env(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(hf_home),
        HF_MODULES_CACHE=str(hf_home / "modules"),  # trust_remote_code copies hyla_hf.py here
    )
    output = tmp_path / "lm_eval"
    command = [
        "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={exported},trust_remote_code=True",
        "--tasks", "hyla_smoke", "--include_path", include,
        "--batch_size", "4", "--log_samples", "--output_path", str(output),
    ]  # fmt: skip
    done = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=LM_EVAL_CEILING_S
    )
    assert done.returncode == 0, done.stderr[-8000:]
    (results_file,) = output.glob("*/results_*.json")
    assert set(json.loads(results_file.read_text())["results"]) == set(TASKS)

    model = HybridLM.from_pretrained(str(exported))
    docs = (TASKS_DIR / "hyla_smoke.jsonl").read_text().splitlines()
    for task in TASKS:
        samples = _samples(output, task)
        assert sorted(s["doc_id"] for s in samples) == list(range(len(docs)))
        for sample in samples:
            requests = list(sample["arguments"].values())
            assert len(requests) == len(sample["resps"]) > 0
            for request, [[loglikelihood, _]] in zip(requests, sample["resps"], strict=True):
                expected = _continuation_logprob(model, request["arg_0"], request["arg_1"])
                assert float(loglikelihood) == pytest.approx(expected, rel=1e-5), request


@pytest.fixture(scope="module")
def registered(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The export logged to a run of a SQLite MLflow store and registered:
    (tracking URI, `models:/NAME/VERSION`)."""
    root = tmp_path_factory.mktemp("mlflow")
    tracking = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking)
    experiment = client.create_experiment("clients", artifact_location=str(root / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    before = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    version = log_model(exported, tracking, run_id, 0, str(exported), register_as="smoke-lm")
    # the process keeps its own store: other clients of this process are not redirected
    assert (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == before
    return tracking, f"models:/smoke-lm/{version}"


def _mlflow_env(tracking: str) -> dict[str, str]:
    """The environment of a process that reads this test's store, for tracking and registry
    both (a registry URI another test in this process left behind would win otherwise)."""
    return _venv_env(MLFLOW_TRACKING_URI=tracking, MLFLOW_REGISTRY_URI=tracking)


def _expected_completion(exported: Path) -> str:
    """hyla's own greedy continuation of PROMPT, as the MLflow model computes it."""
    model = HybridLM.from_pretrained(str(exported))
    return generate_text(model, exported_tokenizer(exported), PROMPT, NEW_TOKENS)


def test_registered_model_predicts_in_a_fresh_process(exported, registered):
    tracking, uri = registered
    code = (
        "import json, sys, mlflow.pyfunc\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "params = {'max_new_tokens': int(sys.argv[3])}\n"
        "print(json.dumps(model.predict([sys.argv[2]], params=params)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, uri, PROMPT, str(NEW_TOKENS)],
        env=_mlflow_env(tracking),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-8000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [_expected_completion(exported)]


def test_registered_model_answers_over_http(exported, registered, tmp_path):
    """`mlflow models serve` in a process group of its own (it execs uvicorn), stopped by
    that group whatever the test's outcome."""
    tracking, uri = registered
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
        "-h", "127.0.0.1", "-p", str(port), "--workers", "1",
    ]  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            command, env=_mlflow_env(tracking), cwd=tmp_path, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_answering(f"{url}/ping", server, log, SERVE_CEILING_S)
        body = {"inputs": [PROMPT], "params": {"max_new_tokens": NEW_TOKENS}}
        request = Request(
            f"{url}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urlopen(request, timeout=SERVE_CEILING_S) as answer:
            predictions = json.load(answer)
    finally:
        stop_group(server)
    assert predictions == {"predictions": [_expected_completion(exported)]}
