"""Exported models in MLflow: logged to the run that trained them as an MLflow (pyfunc)
model that generates text, and optionally registered in the model registry, each version
tagged with the run's step it came from."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow import MlflowClient

ARTIFACT = "hyla_model"  # the exported folder, inside the logged model
MODEL_NAME = "model"  # the logged model's name within its run
# logged as code (MLflow's models from code): nothing of hyla is pickled into the model
GENERATOR_CODE = Path(__file__).with_name("text_generator.py")
STEP_TAG = "hyla.step"
CHECKPOINT_TAG = "hyla.checkpoint"


def log_model(
    folder: str | Path,
    tracking_uri: str,
    run_id: str,
    step: int,
    checkpoint_url: str,
    register_as: str | None = None,
) -> str | None:
    """Log the exported `folder` to MLflow run `run_id` at `step`; with `register_as`, register
    it under that name too. Returns the registered version (None when not registering). The
    run keeps its status."""
    client = MlflowClient(tracking_uri)
    status = client.get_run(run_id).info.status
    tags = {STEP_TAG: str(step), CHECKPOINT_TAG: checkpoint_url}
    with _process_uris(tracking_uri):
        mlflow.start_run(run_id=run_id)
        try:
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=str(GENERATOR_CODE),
                artifacts={ARTIFACT: str(folder)},
                pip_requirements=["hyla", "torch", "safetensors", "tokenizers"],
                signature=_signature(),
                step=step,
                tags=tags,
            )
        finally:
            mlflow.end_run(status)
        if register_as is None:
            return None
        return mlflow.register_model(info.model_uri, register_as, tags=tags).version


@contextmanager
def _process_uris(uri: str) -> Iterator[None]:
    """MLflow's fluent API (the only way to log a pyfunc model) reads the process-wide
    tracking and registry URIs; setting them also exports MLFLOW_TRACKING_URI and
    MLFLOW_REGISTRY_URI. Both are put back on exit, so that the caller's other clients (and
    processes it starts later) keep the store they were given."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    environment = {name: os.environ.get(name) for name in names}
    saved = tracking_utils._tracking_uri, registry_utils._registry_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for name, value in environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _signature():
    """Prompts in, continuations out; the generation settings as inference-time params."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [
                ParamSpec("max_new_tokens", "long", 64),
                ParamSpec("temperature", "double", 0.0),
                ParamSpec("top_p", "double", 1.0),
                ParamSpec("seed", "long", 0),
            ]
        ),
    )
