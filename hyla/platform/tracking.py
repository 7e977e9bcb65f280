"""MLflow tracking for the trainer: params, per-step metrics, the resolved config, checkpoint
URIs and system metrics of one run, continued across restarts.

Every rank builds a `Tracker`; only rank 0 talks to MLflow and the others do nothing. One
writer is also what a SQLite store needs: several processes writing one SQLite file lock it.
The client uses explicit run ids (MlflowClient), never mlflow's global active run. Once a run
is started, what training tracks goes through an `Outbox`: training never waits for the
store, and an outage only delays the points (`hyla.platform.outbox`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import url2pathname, urlopen

from mlflow import MlflowClient
from mlflow.entities import Param, Run
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from hyla.platform.config import TrackingConfig
from hyla.platform.outbox import LAST_CHECKPOINT_TAG, Outbox, adopt_legacy_spool, latest_steps
from hyla.platform.paths import SPOOL_DIR

log = logging.getLogger(__name__)

STATUSES = ("FINISHED", "FAILED", "KILLED")
CONFIG_ARTIFACT = "config.yaml"
__all__ = [
    "LAST_CHECKPOINT_TAG",
    "Tracker",
    "check_store",
    "resolve_tracking_uri",
    "settle_run",
]
# mlflow retries a refused HTTP connection for minutes by default; start() asks once.
PROBE_TIMEOUT_S = 5.0
_MISSING_RUN_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")

T = TypeVar("T")


def resolve_tracking_uri(cfg: TrackingConfig, run_dir: str) -> str:
    """cfg.uri, else MLFLOW_TRACKING_URI, else sqlite:///<absolute run_dir>/mlflow.db."""
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    parts = urlsplit(run_dir)
    if parts.scheme not in ("", "file"):
        raise ValueError(
            f"run_dir must be a local path for the default SQLite tracking store, got "
            f"{run_dir!r}; set tracking.uri or MLFLOW_TRACKING_URI to track elsewhere"
        )
    local = url2pathname(parts.path) if parts.scheme == "file" else run_dir
    return f"sqlite:///{Path(local).resolve() / 'mlflow.db'}"


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (None for other stores and in-memory SQLite)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path).resolve() if path and path != ":memory:" else None


def _check_reachable(uri: str) -> None:
    """Raise ConnectionError naming `uri` if an http(s) tracking server does not answer.
    Any HTTP answer counts, an error status included: only the connection is checked."""
    if urlsplit(uri).scheme not in ("http", "https"):
        return
    try:
        with urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S):
            pass
    except HTTPError:
        pass
    except (URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionError(
            f"the MLflow tracking server {uri} is unreachable ({reason}); start it, or point "
            f"tracking.uri / MLFLOW_TRACKING_URI at a running one"
        ) from e


def check_store(uri: str) -> None:
    """ValueError naming the store when it does not work: a server that does not answer, a
    URI MLflow does not know, a SQLite database that cannot be opened or created."""
    try:
        _check_reachable(uri)
        database = _sqlite_file(uri)
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:
        raise ValueError(
            f"the MLflow tracking store {uri!r} (tracking.uri, else MLFLOW_TRACKING_URI, else "
            f"SQLite in checkpoint.dir) does not work: {type(e).__name__}: {e}"
        ) from None


def settle_run(record_url: str, status: str, replacing: tuple[str, ...] = ("RUNNING",)) -> None:
    """End the MLflow run recorded at `record_url` ({"run_id", "tracking_uri"}) with `status`
    if its status is one of `replacing` (by default: still RUNNING): a job whose workers died
    could not end it themselves. Cleanup only: a missing record or an unreachable store is a
    warning, never an error."""
    import json

    import fsspec

    try:
        with fsspec.open(record_url, "r") as f:
            record = json.load(f)
        client = MlflowClient(record["tracking_uri"])
        if client.get_run(record["run_id"]).info.status in replacing:
            client.set_terminated(record["run_id"], status)
    except FileNotFoundError:
        return
    except Exception as e:
        log.warning("could not mark the MLflow run in %s %s: %s", record_url, status, e)


def _short_http_requests(timeout: float) -> None:
    """MLflow retries a failing HTTP request for minutes by default; hyla's outbox retries
    by itself, so each request gets one try of `timeout` seconds (unless the environment
    already says otherwise)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(timeout))))


def _batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _param_value(value: Any) -> str:
    """How MLflow stores a param: a string, cut to its length limit."""
    return str(value)[:MAX_PARAM_VAL_LENGTH]


class Tracker:
    """One MLflow run, written by rank 0; on every other rank each method does nothing.

    A restarted job passes the run id saved in its checkpoint to `start` and continues the
    same run. Continuity of the metric history: a job resumed from the checkpoint at step s
    re-runs steps s+1.. that may have been logged before the crash. `start` reads, for each
    metric key, the step of its latest point, and `log_metrics` drops every (key, step) at or
    below it. Resumes are bit-identical, so the dropped values equal the logged ones, and each
    key keeps one point per step. The same holds within a session: a key's steps must grow.

    MLflow params are immutable. On resume, params with a new value keep the run's original
    value (a warning names them), params the run lacks are added, and a changed config is
    kept as the artifact config-resume-<k>.yaml next to the original config.yaml.
    """

    def __init__(
        self, cfg: TrackingConfig, run_dir: str, rank: int, spool_dir: str | None = None
    ) -> None:
        """run_dir: the local folder of the default SQLite store; spool_dir: the folder of
        the spools, where points wait while the store is unreachable (default:
        run_dir/tracking-spool)."""
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank must be an integer >= 0, got {rank!r}")
        self.cfg = cfg
        self.rank = rank
        self.uri = resolve_tracking_uri(cfg, run_dir) if rank == 0 else None
        self.spool_dir = spool_dir or f"{run_dir.rstrip('/')}/{SPOOL_DIR}"
        self.run_id: str | None = None
        self._client: MlflowClient | None = None  # set between start() and finish()
        self._outbox: Outbox | None = None
        self._last_steps: dict[str, int] = {}
        self._monitor: SystemMetricsMonitor | None = None

    def start(self, run_id: str | None, params: dict[str, Any], config_yaml: str) -> str | None:
        """Create a run (named cfg.run_name in experiment cfg.experiment) or continue `run_id`,
        log `params` (flattened config, e.g. JobConfig.flat()) and `config_yaml` as the
        artifact config.yaml, and start system metrics if cfg.system_metrics. Returns the run
        id on rank 0, None elsewhere. An unreachable tracking server raises ConnectionError
        within PROBE_TIMEOUT_S."""
        if self.rank != 0:
            return None
        if self._client is not None:
            raise RuntimeError(f"Tracker.start: run {self.run_id} is already started")
        assert self.uri is not None
        adopt_legacy_spool(self.spool_dir)  # before the run: one that does not parse stops here
        _check_reachable(self.uri)
        _short_http_requests(self.cfg.request_timeout)
        database = _sqlite_file(self.uri)
        if database is not None:
            database.parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(self.uri)
        self._client, self._last_steps = client, {}
        values = {key: _param_value(value) for key, value in params.items()}
        try:
            if run_id is None:
                self.run_id = self._create(client, database, values, config_yaml)
            else:
                self._resume(client, run_id, values, config_yaml)
                self.run_id = run_id
            if self.cfg.system_metrics:
                self._monitor = SystemMetricsMonitor(
                    self.run_id,
                    sampling_interval=self.cfg.system_metrics_interval,
                    resume_logging=run_id is not None,
                    tracking_uri=self.uri,
                )
                self._monitor.start()
        except BaseException:
            self._client, self.run_id = None, None
            raise
        self._outbox = Outbox(
            client,
            self.run_id,
            self.uri,
            self.spool_dir,
            self.cfg.retry_interval,
            self._last_steps,
        )
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log `metrics` at `step`, except keys already logged at this step or later."""
        if self.rank != 0:
            return
        outbox = self._started("log_metrics")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        fresh = {k: float(v) for k, v in metrics.items() if step > self._last_steps.get(k, -1)}
        if fresh:
            op = {"kind": "metrics", "step": step, "time_ms": int(time.time() * 1000)}
            outbox.put({**op, "values": fresh})
            self._last_steps.update((key, step) for key in fresh)

    def log_checkpoint(self, url: str, step: int) -> None:
        """Record a saved checkpoint: the artifact checkpoints/<step>.json ({"step", "url"})
        and the tag hyla.last_checkpoint = url."""
        if self.rank != 0:
            return
        self._started("log_checkpoint").put({"kind": "checkpoint", "step": step, "url": url})

    def suspend(self) -> None:
        """Like finish(), but the run stays RUNNING: the job stops to go on elsewhere (an
        elastic run that restarts at another size)."""
        self._end(None)

    def set_tag(self, key: str, value: str) -> None:
        if self.rank != 0:
            return
        self._started("set_tag").put({"kind": "tag", "key": key, "value": value})

    def finish(self, status: str = "FINISHED") -> None:
        """Stop system metrics (flushing them), end the run with `status` and send what is
        queued: for up to tracking.finish_timeout seconds if the store is lost, after which
        the rest stays spooled (`hyla sync RUN` sends it). A second call, or a call before
        start(), does nothing."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        self._end(status)

    def _end(self, status: str | None) -> None:
        if self._client is None:
            return
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        outbox = self._outbox
        assert outbox is not None  # start() sets it after the client
        if status is not None:
            outbox.put({"kind": "terminate", "status": status})
        if not outbox.close(self.cfg.finish_timeout):
            log.warning(
                "the MLflow tracking store %s did not answer before the run ended: what run "
                "%s tracked since waits in %s; `hyla sync RUN` sends it",
                self.uri,
                self.run_id,
                outbox.spool_url,
            )
        self._client, self._outbox = None, None

    def _started(self, method: str) -> Outbox:
        """The started run's outbox."""
        if self._outbox is None:
            raise RuntimeError(f"Tracker.{method} needs a started run: call start() first")
        return self._outbox

    def _create(
        self, client: MlflowClient, database: Path | None, values: dict[str, str], config_yaml: str
    ) -> str:
        """A new run; its id."""
        run = client.create_run(self._experiment_id(client, database), run_name=self.cfg.run_name)
        run_id = run.info.run_id
        self._log_params(client, run_id, values)
        client.log_text(run_id, config_yaml, CONFIG_ARTIFACT)
        return run_id

    def _resume(
        self, client: MlflowClient, run_id: str, values: dict[str, str], config_yaml: str
    ) -> None:
        run = self._existing_run(client, run_id)
        client.update_run(run_id, status="RUNNING")
        self._last_steps = latest_steps(client, run_id)
        self._resume_params(client, run_id, run.data.params, values, config_yaml)

    def _experiment_id(self, client: MlflowClient, database: Path | None) -> str:
        """cfg.experiment's id, creating it if needed. A SQLite store keeps its artifacts in
        mlartifacts/ next to the database (mlflow's default is ./mlruns under the cwd)."""
        name = self.cfg.experiment
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = (database.parent / "mlartifacts").as_uri() if database else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:
            experiment = client.get_experiment_by_name(name)  # another job created it first
            if experiment is None:
                raise
            return experiment.experiment_id

    def _existing_run(self, client: MlflowClient, run_id: str) -> Run:
        try:
            run = client.get_run(run_id)
        except MlflowException as e:
            if e.error_code not in _MISSING_RUN_CODES:
                raise
            raise ValueError(
                f"run_id {run_id!r} is not a run in the tracking store {self.uri}: {e.message}"
            ) from e
        if run.info.lifecycle_stage != "active":
            raise ValueError(
                f"run_id {run_id!r} is deleted in the tracking store {self.uri}; restore it "
                f"(mlflow runs restore) to continue it"
            )
        return run

    def _log_params(self, client: MlflowClient, run_id: str, values: dict[str, str]) -> None:
        items = [Param(key, value) for key, value in values.items()]
        for batch in _batches(items, MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=batch)

    def _resume_params(
        self,
        client: MlflowClient,
        run_id: str,
        stored: dict[str, str],
        values: dict[str, str],
        yaml: str,
    ) -> None:
        changed = sorted(key for key, value in values.items() if stored.get(key, value) != value)
        added = {key: value for key, value in values.items() if key not in stored}
        self._log_params(client, run_id, added)
        if not (changed or added):
            return
        resumes = [
            item.path
            for item in client.list_artifacts(run_id)
            if item.path.startswith("config-resume-")
        ]
        artifact = f"config-resume-{len(resumes) + 1}.yaml"
        client.log_text(run_id, yaml, artifact)
        if changed:
            log.warning(
                "run %s continues with a changed config; MLflow params are immutable, so %s "
                "keep their original values; the new config is the artifact %s",
                run_id,
                changed,
                artifact,
            )
