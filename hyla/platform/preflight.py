"""What a job checks on the driver before it starts anything (Ray, workers, files under the
run's name): each problem is a ValueError naming the key, what it holds and what would work,
raised in seconds instead of inside every worker after a minute of start-up.

- data: the source resolves and parses, the tokenizer loads and fits the model, and there is
  data for one global batch and (for a token store) the validation sequences
  (`hyla.platform.data.check_data`);
- checkpoint storage: checkpoint.dir takes a probe object, which is deleted again;
- tracking: the MLflow store answers (a server) or can be opened or created (SQLite).
"""

from __future__ import annotations

import uuid

from fsspec.core import url_to_fs

from hyla.platform.config import JobConfig
from hyla.platform.data import check_data
from hyla.platform.tracking import check_store, resolve_tracking_uri


def preflight(cfg: JobConfig, run_dir: str, training: bool = True) -> None:
    """Every check, in the order a run meets them; `run_dir` is the local folder of the
    default SQLite tracking store. An evaluation (`training` false) needs no training data."""
    check_data(cfg.data, cfg.model.vocab_size, cfg.parallel.dp, training)
    check_writable(cfg.checkpoint.dir)
    check_store(resolve_tracking_uri(cfg.tracking, run_dir))


def check_writable(root: str) -> None:
    """checkpoint.dir takes a small object, written and deleted at its top."""
    try:
        fs, path = url_to_fs(root)
    except (ValueError, ImportError) as e:
        raise ValueError(f"checkpoint.dir {root!r} is not a usable fsspec URL: {e}") from None
    probe = f"{path.rstrip('/')}/.hyla-preflight-{uuid.uuid4().hex[:12]}"
    try:
        fs.makedirs(path, exist_ok=True)
        fs.pipe_file(probe, b"hyla preflight probe\n")
        fs.rm(probe)
    except Exception as e:  # permissions, a missing bucket, a read-only disk, ...
        raise ValueError(
            f"checkpoint.dir {root!r} is not writable: {type(e).__name__}: {e}"
        ) from None
