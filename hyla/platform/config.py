"""The job's configuration: hydra composes configs/train.yaml with overrides, and one typed
schema validates the result. Errors name the key, the value received and what is allowed.

The composed config is turned into plain dataclasses on the driver, so workers receive
ordinary Python values (nothing of hydra's runtime).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf

from hyla.models.config import ModelConfig
from hyla.parallel import (
    DATA_PARALLEL,
    LAYOUTS,
    ArgumentError,
    ParallelDims,
    SequenceLayout,
    check_method,
    check_model,
    check_supports,
)
from hyla.platform.data import DataConfig
from hyla.platform.fieldtypes import check_types
from hyla.platform.paths import RESERVED_NAMES

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SCHEDULES = ("cosine", "wsd")
PRECISIONS = ("fp32", "bf16")


def _integer(section: str, name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{section}.{name} must be an integer >= {low}, got {value!r}")


def _number(
    section: str,
    name: str,
    value: Any,
    low: float,
    high: float | None = None,
    above: bool = False,
) -> None:
    """`value` must be a number >= low (> low with `above`), and <= high if given."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    ok = ok and (value > low if above else value >= low) and (high is None or value <= high)
    if not ok:
        if high is None:
            allowed = f"> {low}" if above else f">= {low}"
        else:
            allowed = f"in {'(' if above else '['}{low}, {high}]"
        raise ValueError(f"{section}.{name} must be a number {allowed}, got {value!r}")


def _text(section: str, name: str, value: Any, meaning: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{section}.{name} must be {meaning}, not empty, got {value!r}")


SP_LAYOUTS = ("auto", *LAYOUTS)
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
SEED_LIMIT = 2**32  # as data.seed: seeds above it overflow where they are packed
# hyla.parallel's argument names -> the config keys (or words) that set them
PARALLEL_KEYS = {
    "method": "parallel.sp_method",
    "layout": "parallel.sp_layout",
    "dp": "parallel.dp",
    "sp": "parallel.sp",
    "world": "parallel.sp",  # a layout's ranks: the sequence-parallel group's
    "world_size": "the world size",
    "length": "data.seq_len",
}


@contextmanager
def parallel_keys() -> Iterator[None]:
    """Re-raise hyla.parallel's argument errors naming the config keys that set them."""
    try:
        yield
    except ArgumentError as err:
        raise err.renamed(PARALLEL_KEYS) from None


def check_run_name(name: Any, where: str = "tracking.run_name") -> None:
    """A run's name is one path segment under checkpoint.dir: it must never lead elsewhere
    (no '/', '..', '~', ':', '%' or other URL-special characters), read as an option (a
    leading '-') or be a name the storage root uses for something else (RESERVED_NAMES)."""
    reserved = isinstance(name, str) and (name in RESERVED_NAMES or name.startswith("mlflow.db"))
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or reserved:
        raise ValueError(
            f"{where} must be 1 to 100 letters, digits, '-', '_' or '.' starting with a "
            f"letter or digit, and none of {list(RESERVED_NAMES)} (which checkpoint.dir "
            f"holds beside runs), got {name!r}"
        )


@dataclass
class ParallelConfig:
    dp: int = 1  # data-parallel replicas
    sp: int = 1  # sequence-parallel ranks per replica
    sp_method: str = "lasp2"
    # Which pieces of each sequence a rank holds: contiguous (one each) or zigzag (pieces r
    # and 2 sp - 1 - r of 2 sp, which balances causal attention); auto resolves to zigzag
    # for models with attention layers under lasp2, contiguous otherwise.
    sp_layout: str = "auto"
    # How gradients are summed over all dp x sp ranks: ddp (replicated parameters) or fsdp
    # (FSDP2: parameters, gradients and optimizer state sharded over every rank)
    data_parallel: str = "ddp"

    def __post_init__(self) -> None:
        _integer("parallel", "dp", self.dp, 1)
        _integer("parallel", "sp", self.sp, 1)
        if self.data_parallel not in DATA_PARALLEL:
            raise ValueError(
                f"parallel.data_parallel must be one of {DATA_PARALLEL}, got {self.data_parallel!r}"
            )
        with parallel_keys():
            check_method(self.sp_method)
        if self.sp_layout not in SP_LAYOUTS:
            raise ValueError(
                f"parallel.sp_layout must be one of {SP_LAYOUTS}, got {self.sp_layout!r}"
            )

    @property
    def world_size(self) -> int:
        return self.dp * self.sp


def resolve_layout(requested: str, method: str, layers: list[str], sp: int) -> str:
    """parallel.sp_layout=auto: zigzag where it pays (attention layers, whose causal work a
    contiguous split leaves unbalanced) and is supported (lasp2); contiguous otherwise."""
    if requested != "auto":
        return requested
    zigzag = "A" in layers and method == "lasp2" and sp > 1
    return "zigzag" if zigzag else "contiguous"


@dataclass
class OptimConfig:
    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # the largest global gradient norm; 0 turns clipping off
    schedule: str = "cosine"
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2

    def __post_init__(self) -> None:
        _number("optim", "lr", self.lr, 0.0, above=True)
        _number("optim", "weight_decay", self.weight_decay, 0.0)
        _number("optim", "grad_clip", self.grad_clip, 0.0)
        _integer("optim", "warmup_steps", self.warmup_steps, 0)
        _number("optim", "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _number("optim", "decay_fraction", self.decay_fraction, 0.0, 1.0)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")


@dataclass
class TrainerConfig:
    steps: int = 60
    grad_accum: int = 1
    log_every: int = 5
    eval_every: int = 20
    eval_batches: int = 2
    precision: str = "fp32"
    # torch.compile each block (inductor; on CPU it needs a C++ compiler, and compiling
    # takes minutes before the first step)
    compile: bool = False
    seed: int = 0
    # A run resumed at another dp keeps its global batch (dp x data.batch_size x grad_accum;
    # hyla adjusts grad_accum, then batch_size); true lets a resume change it instead.
    allow_batch_change: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "grad_accum", "log_every", "eval_every"):
            _integer("trainer", name, getattr(self, name), 1)
        _integer("trainer", "eval_batches", self.eval_batches, 0)  # 0: no evaluation
        _integer("trainer", "seed", self.seed, 0)
        if self.seed >= SEED_LIMIT:
            raise ValueError(f"trainer.seed must be in [0, 2**32), got {self.seed}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"trainer.precision must be one of {PRECISIONS}, got {self.precision!r}"
            )


@dataclass
class CheckpointConfig:
    dir: str = "runs"  # the storage root, any fsspec URL; see hyla.platform.paths.run_storage
    every: int = 20
    keep_last: int = 3

    def __post_init__(self) -> None:
        _text("checkpoint", "dir", self.dir, "a path or fsspec URL")
        _integer("checkpoint", "every", self.every, 1)
        _integer("checkpoint", "keep_last", self.keep_last, 1)


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else a SQLite store in the run directory
    experiment: str = "hyla"
    run_name: str | None = None
    system_metrics: bool = True  # cpu, memory, disk, network (and gpu with nvidia-ml-py)
    system_metrics_interval: float = 10.0  # seconds between samples
    # When the store stops answering, training goes on and points wait in a spool file:
    request_timeout: float = 10.0  # seconds one MLflow request may take
    retry_interval: float = 30.0  # seconds between tries to reach a lost store
    finish_timeout: float = 60.0  # at the end of a run, how long to wait for a lost store
    log_model: bool = True  # at the end of a run, log the final model to its MLflow run
    register_model: str | None = None  # and register it in the model registry under this name

    def __post_init__(self) -> None:
        for name in ("system_metrics", "log_model"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"tracking.{name} must be true or false, got {getattr(self, name)!r}"
                )
        if self.register_model is not None and (
            not isinstance(self.register_model, str) or not self.register_model.strip()
        ):
            raise ValueError(
                f"tracking.register_model must be a model name or null, got {self.register_model!r}"
            )
        _text("tracking", "experiment", self.experiment, "an MLflow experiment name")
        _number("tracking", "system_metrics_interval", self.system_metrics_interval, 0.1)
        _number("tracking", "request_timeout", self.request_timeout, 1.0)
        _number("tracking", "retry_interval", self.retry_interval, 0.1)
        _number("tracking", "finish_timeout", self.finish_timeout, 0.0)
        if self.run_name is not None:
            check_run_name(self.run_name)


@dataclass
class ClusterConfig:
    address: str | None = None
    use_gpu: bool = False
    cpus_per_worker: float = 1
    max_failures: int = 3  # worker-group restarts after failures; each resumes from a checkpoint
    # Elastic runs: as many workers as the cluster holds within [min_workers, max_workers]
    # (multiples of parallel.sp), shrinking when nodes are lost and growing when they return
    min_workers: int | None = None
    max_workers: int | None = None
    resize_interval: float = 60.0  # seconds between looks for room to grow

    def __post_init__(self) -> None:
        _number("cluster", "cpus_per_worker", self.cpus_per_worker, 0.0, above=True)
        _integer("cluster", "max_failures", self.max_failures, 0)
        _number("cluster", "resize_interval", self.resize_interval, 0.1)
        if (self.min_workers is None) != (self.max_workers is None):
            raise ValueError(
                f"cluster.min_workers and cluster.max_workers are set together (an elastic "
                f"run) or not at all, got {self.min_workers!r} and {self.max_workers!r}"
            )
        if self.elastic:
            low, high = self.worker_bounds()
            _integer("cluster", "min_workers", low, 1)
            _integer("cluster", "max_workers", high, low)

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None

    def worker_bounds(self) -> tuple[int, int]:
        """An elastic run's (min_workers, max_workers)."""
        if self.min_workers is None or self.max_workers is None:
            raise ValueError("cluster.min_workers and cluster.max_workers are unset: not elastic")
        return self.min_workers, self.max_workers


@dataclass
class JobConfig:
    model: ModelConfig
    parallel: ParallelConfig
    data: DataConfig
    optim: OptimConfig
    trainer: TrainerConfig
    checkpoint: CheckpointConfig
    tracking: TrackingConfig
    cluster: ClusterConfig

    def __post_init__(self) -> None:
        self._resolve_layout()
        if self.parallel.sp > 1:
            self._check_sequence_parallel()
        if self.cluster.elastic:
            self._check_elastic()
        if self.model.loss_chunk_size < 1:
            raise ValueError(
                f"model.loss_chunk_size must be >= 1, got {self.model.loss_chunk_size}"
            )
        warmup, steps = self.optim.warmup_steps, self.trainer.steps
        if warmup > steps:
            # the schedule would end before it reaches optim.lr (a resume that raises
            # trainer.steps is checked against the steps it will run to)
            raise ValueError(
                f"optim.warmup_steps must be <= trainer.steps (the run would never reach "
                f"optim.lr), got optim.warmup_steps={warmup} and trainer.steps={steps}"
            )

    def _resolve_layout(self) -> None:
        parallel = self.parallel
        parallel.sp_layout = resolve_layout(
            parallel.sp_layout, parallel.sp_method, self.model.pattern, parallel.sp
        )

    def _check_sequence_parallel(self) -> None:
        """What hyla.parallel checks when the trainer builds the split and parallelizes the
        model, checked here before anything starts: the same checks, in config keys."""
        parallel = self.parallel
        with parallel_keys():
            layout = SequenceLayout.even(parallel.sp_layout, self.data.seq_len, parallel.sp)
            if layout.kind != "contiguous":
                check_supports(parallel.sp_method, "zigzag")
            check_model(parallel.sp_method, self.model, parallel.sp)
            if self.data.document_masking:
                check_supports(parallel.sp_method, "documents")

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step: dp x data.batch_size x trainer.grad_accum."""
        return self.parallel.dp * self.data.batch_size * self.trainer.grad_accum

    def elastic_dps(self) -> list[int]:
        """The dp values an elastic run may take: within the worker bounds, and dividing the
        global batch (which every dp must keep)."""
        sp, (low, high) = self.parallel.sp, self.cluster.worker_bounds()
        return [dp for dp in range(-(-low // sp), high // sp + 1) if self.global_batch % dp == 0]

    def _check_elastic(self) -> None:
        sp, cluster = self.parallel.sp, self.cluster
        for name in ("min_workers", "max_workers"):
            if getattr(cluster, name) % sp:
                raise ValueError(
                    f"cluster.{name} must be a multiple of parallel.sp = {sp} (whole "
                    f"sequence-parallel groups), got {getattr(cluster, name)}"
                )
        if not self.elastic_dps():
            low, high = cluster.worker_bounds()
            divisors = [d for d in range(1, self.global_batch + 1) if self.global_batch % d == 0]
            raise ValueError(
                f"no dp between cluster.min_workers / sp and cluster.max_workers / sp "
                f"({low // sp}..{high // sp}) divides the "
                f"global batch of {self.global_batch} sequences (parallel.dp x "
                f"data.batch_size x trainer.grad_accum), which every dp must keep; dp values "
                f"that divide it: {divisors}"
            )

    def parallel_dims(self, world_size: int) -> ParallelDims:
        """The mesh's dimensions for a world of `world_size` ranks, which must be dp x sp."""
        with parallel_keys():
            return ParallelDims(dp=self.parallel.dp, sp=self.parallel.sp, world_size=world_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """{"model.d_model": 64, ...}: the resolved config as flat parameters (for MLflow)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, item in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, item)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out


SECTION_TYPES = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "trainer": TrainerConfig,
    "checkpoint": CheckpointConfig,
    "tracking": TrackingConfig,
    "cluster": ClusterConfig,
}


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _check_group_choices(overrides: list[str]) -> None:
    """`group=name` overrides must name an existing file: hydra's own error is opaque."""
    for item in overrides:
        key, sep, value = item.partition("=")
        is_group = sep and key in SECTION_TYPES and (CONFIG_DIR / key).is_dir()
        if is_group and value not in group_options(key):
            raise ValueError(f"{key} must be one of {group_options(key)}, got {value!r}")


def _settable(item: str) -> str:
    """`section.key=value` may set any schema field, also one the chosen group file leaves at
    its default (hydra itself overrides only keys present in the file: `++` adds or
    overrides); an unknown key then fails in from_dict with the list of allowed ones."""
    key = item.partition("=")[0]
    return f"++{item}" if "." in key and key.split(".")[0] in SECTION_TYPES else item


def resolved_dict(cfg: DictConfig | ListConfig) -> dict[str, Any]:
    """A config mapping as plain nested dicts, interpolations resolved."""
    # to_container is annotated for every kind of node; a mapping's is a dict
    return cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))


def with_overrides(cfg: JobConfig, overrides: list[str]) -> JobConfig:
    """`cfg` with dotted key=value overrides applied (a saved run's config, changed on the
    command line), validated again."""
    merged = OmegaConf.merge(OmegaConf.create(cfg.to_dict()), OmegaConf.from_dotlist(overrides))
    return from_dict(resolved_dict(merged))


def from_dict(raw: dict[str, Any]) -> JobConfig:
    """Build and validate a JobConfig from plain nested dicts (e.g. a resolved config)."""
    unknown = sorted(set(raw) - set(SECTION_TYPES))
    if unknown:
        raise ValueError(f"unknown config sections {unknown}; allowed: {sorted(SECTION_TYPES)}")
    sections = {}
    for name, cls in SECTION_TYPES.items():
        values = dict(raw.get(name) or {})
        allowed = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(values) - allowed)
        if extra:
            raise ValueError(
                f"unknown keys {[f'{name}.{k}' for k in extra]}; allowed: {sorted(allowed)}"
            )
        check_types(name, cls, values)
        sections[name] = cls(**values)
    return JobConfig(**sections)


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train") -> JobConfig:
    """hydra-compose configs/<config_name>.yaml with `overrides` and validate it."""
    overrides = list(overrides)
    _check_group_choices(overrides)
    overrides = [_settable(item) for item in overrides]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        try:
            composed = hydra_compose(config_name=config_name, overrides=overrides)
        except HydraException as e:
            raise ValueError(f"bad config override in {overrides}: {e}") from e
    return from_dict(resolved_dict(composed))
