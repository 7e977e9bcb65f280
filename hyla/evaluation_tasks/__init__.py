"""lm-evaluation-harness tasks that need no download: YAML tasks over a JSON-lines file in
this folder. Pass the folder to lm_eval as `--include_path` (`TASKS_DIR`):

    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True \\
        --tasks hyla_smoke --include_path "$(python -m hyla.evaluation_tasks)"

`hyla_smoke` (a tag) runs `hyla_smoke_choice` (multiple choice: the log-likelihood of each
choice after the context, scored by accuracy) and `hyla_smoke_loglikelihood` (the correct
choice as the target continuation: perplexity and whether it is the greedy one). They check
that an export answers an outside client, not what a model has learnt: six examples.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets

TASKS_DIR = Path(__file__).resolve().parent


def local_jsonl(data_file: str, **_: Any) -> datasets.DatasetDict:
    """The tasks' `custom_dataset`: `data_file` (in this folder) as the test split of a
    datasets.DatasetDict. lm_eval calls it with the dataset_kwargs of the YAML and the model's
    arguments as metadata (pretrained=..., ignored here). Read here rather than through
    `dataset_path: json`, whose `data_files` would be relative to the working directory."""
    import datasets

    lines = (TASKS_DIR / data_file).read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
