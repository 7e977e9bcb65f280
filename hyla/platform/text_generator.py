"""The MLflow (pyfunc) model of an exported hyla model: prompts in, continuations out.
MLflow loads this file as the model's code (`mlflow.models.set_model` below)."""

from __future__ import annotations

from typing import Any

from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from hyla.platform.registry import ARTIFACT


class TextGenerator(PythonModel):
    """`mlflow models predict` / `pyfunc.load_model(...).predict(["a prompt", ...])`: each
    prompt's continuation. params: max_new_tokens (64), temperature (0: greedy), top_p, seed."""

    def load_context(self, context: Any) -> None:
        from hyla.models import HybridLM
        from hyla.platform.run_outputs import exported_tokenizer

        folder = context.artifacts[ARTIFACT]
        self.model = HybridLM.from_pretrained(folder)
        self.tokenizer = exported_tokenizer(folder)

    def predict(self, context, model_input, params=None):
        """model_input: prompts, as the signature's string column (a DataFrame) or a list.
        No type hints: MLflow would derive a signature from them instead of the one logged."""
        from hyla.platform.run_outputs import generate_text

        params = params or {}
        prompts = model_input.iloc[:, 0] if hasattr(model_input, "iloc") else model_input
        return [
            generate_text(
                self.model,
                self.tokenizer,
                str(prompt),
                int(params.get("max_new_tokens", 64)),
                temperature=float(params.get("temperature", 0.0)),
                top_p=float(params.get("top_p", 1.0)),
                seed=int(params.get("seed", 0)),
            )
            for prompt in prompts
        ]


set_model(TextGenerator())
