"""Exported models in MLflow: logged to the run that trained them as an MLflow (pyfunc)
model that generates text, and optionally registered in the model registry, each version
tagged with the run's step it came from."""

from __future__ import annotations

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
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    mlflow.start_run(run_id=run_id)
    try:
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(GENERATOR_CODE),
            artifacts={ARTIFACT: str(folder)},
            pip_requirements=["hyla", "torch", "safetensors", "tokenizers"],
            signature=_signature(),
            step=step,
            tags={STEP_TAG: str(step), CHECKPOINT_TAG: checkpoint_url},
        )
    finally:
        mlflow.end_run(status)
    if register_as is None:
        return None
    version = mlflow.register_model(
        info.model_uri, register_as, tags={STEP_TAG: str(step), CHECKPOINT_TAG: checkpoint_url}
    )
    return version.version


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
