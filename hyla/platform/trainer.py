"""The training loop every worker runs.

Each rank of the (dp, sp) mesh builds the same model, loads the samples of its dp rank and
keeps its sp slice of every sequence. Under sequence parallelism a rank's loss is its part of
the whole sequence's loss (the parts sum to it), so gradients must be summed over sp and
averaged over dp: `hyla.parallel.parallelize`, called once on the built model, applies that
with every other training policy, and the trainer scales the loss by its accumulation only.

A job resumes by itself: at start it loads the newest complete checkpoint of its run, if
any, and continues the same MLflow run. Runs are deterministic on CPU: the same config gives
bit-identical losses, with or without a resume in between.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torchdata.stateful_dataloader import StatefulDataLoader

from hyla.models.hybrid import IGNORE_INDEX, HybridLM
from hyla.parallel import SequenceParallel, TrainingPolicy, parallelize
from hyla.parallel.comm import TRACKER
from hyla.platform.checkpoint import CheckpointStore
from hyla.platform.config import JobConfig
from hyla.platform.console import ProgressConsole
from hyla.platform.data import build_datasets, build_loader, data_identity
from hyla.platform.paths import (
    RESIZE_FILE,
    SPOOL_DIR,
    TRACKING_FILE,
    local_run_dir,
    run_folder,
    run_storage,
)
from hyla.platform.schedule import lr_multiplier
from hyla.platform.tracking import Tracker, resolve_tracking_uri

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_name: str
    run_id: str | None  # MLflow run (rank 0 only)
    tracking_uri: str
    checkpoint_url: str
    losses: dict[int, float] = field(default_factory=dict)  # step -> training loss
    final_loss: float = math.nan
    val_loss: float = math.nan
    tokens_per_second: float = 0.0
    resumed_from: int | None = None  # the checkpoint's step, if the job resumed
    stopped_to_resize: bool = False  # an elastic run stopped to grow (see RESIZE_FILE)


class Trainer:
    def __init__(self, cfg: JobConfig, device: torch.device | None = None) -> None:
        self.cfg = cfg
        self.device = device or torch.device("cpu")
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        world = dist.get_world_size() if distributed else 1
        dims = cfg.parallel_dims(world)
        mesh = dims.build_mesh(self.device.type) if distributed else None
        self.dp_rank, self.sp = 0, None
        if mesh is not None:
            self.dp_rank = mesh.get_local_rank("dp")
            if dims.sp > 1:
                self.sp = SequenceParallel.even(
                    cfg.data.seq_len,
                    mesh.get_group("sp"),
                    cfg.parallel.sp_method,
                    cfg.parallel.sp_layout,
                )
        torch.manual_seed(cfg.trainer.seed)

        self.model = HybridLM(cfg.model).to(self.device)
        policy = TrainingPolicy(self.sp, cfg.parallel.data_parallel, cfg.trainer.compile)
        self.wrapped = parallelize(self.model, mesh, policy)  # every training policy
        self.fsdp = isinstance(self.model, FSDPModule)
        self.optimizer = _adamw(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_multiplier(cfg.optim, cfg.trainer.steps)
        )

        self.train_set, self.val_set = build_datasets(cfg.data, cfg.model.vocab_size)
        self.data_identity = data_identity(cfg.data)
        self.dp = dims.dp
        self.batches: Iterator[dict[str, Tensor]] | None = None
        self.step = 0
        self.consumed = 0  # samples of the run's stream consumed so far (all dp ranks)
        self.batch_changed_at: int | None = None  # the step where the global batch changed
        self.store = CheckpointStore(run_storage(cfg), cfg.checkpoint.keep_last)
        local = str(local_run_dir(cfg))
        self.tracking_uri = resolve_tracking_uri(cfg.tracking, local)
        spools = f"{run_folder(cfg)}/{SPOOL_DIR}"
        self.tracker = Tracker(cfg.tracking, local, self.rank, spool_dir=spools)

    # ---------------------------------------------------------------- data

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step, over every dp rank and micro-batch."""
        return self.cfg.global_batch

    def _next_batch(self) -> dict[str, Tensor]:
        """The next micro-batch of this dp rank, cut to this rank's sp pieces."""
        if self.batches is None:  # (re)start the stream where the run stands
            loader = build_loader(
                self.cfg.data,
                self.train_set,
                self.dp_rank,
                self.dp,
                self.cfg.trainer.grad_accum,
                start=self.consumed,
            )
            self.batches = iter(loader)
        return {k: self._local(v) for k, v in next(self.batches).items()}

    def _local(self, x: Tensor) -> Tensor:
        return (x if self.sp is None else self.sp.shard(x)).to(self.device)

    def _forward(self, module: torch.nn.Module, batch: dict[str, Tensor]):
        with self._autocast():
            return module(batch["input_ids"], batch["labels"], **_documents(batch))

    def _sharded(self) -> FSDPModule:
        """The model under FSDP: fully_shard made its class an FSDPModule too."""
        assert isinstance(self.model, FSDPModule)
        return self.model

    def _autocast(self) -> torch.autocast:
        bf16 = self.cfg.trainer.precision == "bf16"
        return torch.autocast(self.device.type, torch.bfloat16, enabled=bf16)

    def _gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Gradients are exchanged on the last micro-batch of a step only."""
        if self.fsdp:
            self._sharded().set_requires_gradient_sync(sync)
        elif not sync and isinstance(self.wrapped, DistributedDataParallel):
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    # ---------------------------------------------------------------- steps

    def train_step(self) -> dict[str, float]:
        """One optimizer step over trainer.grad_accum micro-batches; returns its metrics."""
        accum = self.cfg.trainer.grad_accum
        start = time.perf_counter()
        TRACKER.reset()
        self.wrapped.train()
        sums = torch.zeros(3, dtype=torch.float64)  # ce_sum, n_tokens, aux over micro-batches
        for micro in range(accum):
            batch = self._next_batch()
            with self._gradient_sync(micro == accum - 1):
                out = self._forward(self.wrapped, batch)
                (out.loss / accum).backward()
            parts = (out.ce_sum.detach(), out.n_tokens, out.aux_loss.detach())
            sums += torch.stack([p.double().cpu() for p in parts])
        clip = self.cfg.optim.grad_clip or math.inf  # 0: no clipping, the norm is still logged
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.consumed += self.global_batch
        comm = TRACKER.summary()
        seconds = time.perf_counter() - start
        ce, n, aux = _sum_over_world(sums).tolist()
        peak, comm_bytes, comm_seconds = _max_over_world(
            [
                _peak_memory(self.device),
                sum(v["bytes"] for v in comm.values()),
                sum(v["seconds"] for v in comm.values()),
            ]
        )
        tokens = self.cfg.parallel.dp * self.cfg.data.batch_size * self.cfg.data.seq_len * accum
        return {
            "loss": ce / max(n, 1),
            "aux_loss": aux / (self.cfg.parallel.dp * accum),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "step_time_s": seconds,
            "tokens_per_s": tokens / seconds,
            "peak_memory_gb": peak / 2**30,
            "comm_bytes": comm_bytes,
            "comm_seconds": comm_seconds,
            "dp": self.dp,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss and perplexity over trainer.eval_batches batches (the same ones
        every time); for MQAR also the recall accuracy at the labelled positions."""
        self.model.eval()
        if self.fsdp:  # hidden_states is not forward: unshard the root's own parameters
            self._sharded().unshard()
        loader = StatefulDataLoader(self.val_set, batch_size=self.cfg.data.batch_size)
        totals = torch.zeros(3, dtype=torch.float64)  # ce_sum, n_tokens, correct
        for i, batch in enumerate(loader):
            if i >= self.cfg.trainer.eval_batches:
                break
            batch = {k: self._local(v) for k, v in batch.items()}
            labels = batch["labels"]
            with self._autocast():
                hidden, _ = self.model.hidden_states(
                    batch["input_ids"], doc_start=batch.get("doc_start")
                )
                ce_sum, n = self.model.loss_terms(hidden, labels)
                counted = labels != IGNORE_INDEX
                correct = self._correct(hidden[counted], labels[counted])
            totals += torch.stack([x.double().cpu() for x in (ce_sum, n, correct)])
        if self.fsdp:
            self._sharded().reshard()
        # every rank of a dp group evaluates the same samples: dp replicas add nothing new
        ce, n, correct = (_sum_over_world(totals) / self.cfg.parallel.dp).tolist()
        loss = ce / max(n, 1)
        return {
            "val_loss": loss,
            "val_perplexity": math.exp(min(loss, 50.0)),
            "val_accuracy": correct / max(n, 1),
        }

    def _correct(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """How many argmax predictions hit their label, loss_chunk_size tokens at a time (the
        [tokens, vocab] logits never exist whole, as in the loss)."""
        size = self.cfg.model.loss_chunk_size
        hits = [
            (self.model.logits(h).argmax(-1) == y).sum()
            for h, y in zip(hidden.split(size), labels.split(size), strict=True)
        ]
        return torch.stack(hits).sum() if hits else labels.new_zeros(())

    # ---------------------------------------------------------------- checkpoints

    def save(self, run_id: str | None) -> str:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        url = self.store.save(
            self.step,
            tensors={"model": model_state, "optimizer": optim_state},
            shared={
                "step": self.step,
                "run_id": run_id,
                "scheduler": self.scheduler.state_dict(),
                "data": self._data_position(),
            },
            per_rank={"rng": _rng_states(self.device)},
        )
        self.tracker.log_checkpoint(url, self.step)
        return url

    def resume(self) -> tuple[int | None, str | None]:
        """Load the newest checkpoint that verifies and loads, if any (older ones are tried
        when newer ones are corrupt): (its step, the MLflow run id in it). A run that has
        checkpoints, none of which loads, is NoLoadableCheckpointError, not a fresh start."""
        self.store.restore_set_aside()
        if not self.store.has_checkpoints():  # fresh: get_state_dict would touch the optimizer
            return None, None
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        tensors: dict[str, Any] = {"model": model_state, "optimizer": optim_state}
        loaded = self.store.load_latest(tensors)
        if loaded is None:
            return None, None
        step, shared, mine = loaded
        data = shared.get("data") or self._assumed_position(shared["step"])
        self._check_global_batch(data, step)
        self._check_same_data(data.get("identity"), step)
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=tensors["model"],
            optim_state_dict=tensors["optimizer"],
        )
        self.scheduler.load_state_dict(shared["scheduler"])
        self.step, self.consumed, self.batches = shared["step"], data["consumed"], None
        if mine is not None:  # the same ranks: each continues its own RNG stream
            _set_rng_states(mine["rng"], self.device)
        else:  # another world size: streams derived from (seed, step, rank)
            torch.manual_seed(self.cfg.trainer.seed * 1_000_003 + self.step * 1_009 + self.rank)
        return step, shared["run_id"]

    def load_weights(self, step: int) -> None:
        """Only the model of checkpoint `step` (to evaluate it): no optimizer, no data
        position, resharded onto this job's dp x sp like a resume."""
        state = get_model_state_dict(self.model)
        self.store.load(step, {"model": state})
        set_model_state_dict(self.model, state)
        self.step = step

    def _assumed_position(self, step: int) -> dict[str, Any]:
        """A checkpoint of an older hyla records no data position: steps x this global batch
        (from a stream that may order the samples otherwise than that hyla did)."""
        log.warning(
            "the checkpoint of step %d records no data position (an older hyla): the run "
            "continues at %d samples consumed, in this hyla's sample order",
            step,
            step * self.global_batch,
        )
        return {**self._data_position(), "consumed": step * self.global_batch}

    def _data_position(self) -> dict[str, Any]:
        """Where the run stands in its sample stream, and the split it was read with."""
        cfg = self.cfg
        return {
            "consumed": self.consumed,
            "global_batch": self.global_batch,
            "dp": self.dp,
            "sp": cfg.parallel.sp,
            "batch_size": cfg.data.batch_size,
            "grad_accum": cfg.trainer.grad_accum,
            "identity": self.data_identity,
        }

    def _check_same_data(self, saved: dict[str, Any] | None, step: int) -> None:
        """A data position means something only on the data, cut and order it was counted
        in: another store, seq_len, seed or shuffle would map it onto other samples. Refused
        unless data.allow_data_change; checkpoints of an older hyla record no identity."""
        if saved is None or saved == self.data_identity:
            return
        changed = sorted(
            k
            for k in saved.keys() | self.data_identity.keys()
            if saved.get(k) != self.data_identity.get(k)
        )
        if not self.cfg.data.allow_data_change:
            raise ValueError(
                f"the checkpoint of step {step} of run {self.cfg.tracking.run_name!r} was "
                f"trained on other data ({', '.join(changed)} differ: "
                f"{ {k: saved.get(k) for k in changed} } then, "
                f"{ {k: self.data_identity.get(k) for k in changed} } now); resume with the "
                f"same data, or set data.allow_data_change=true to continue at the same "
                f"sample position of the new data"
            )
        log.warning(
            "run %s continues from step %d on other data (%s differ; data.allow_data_change)",
            self.cfg.tracking.run_name,
            step,
            ", ".join(changed),
        )

    def _check_global_batch(self, saved: dict[str, int], step: int) -> None:
        """Any dp, sp, batch size and accumulation continue a run exactly as long as the
        global batch stays (the driver adjusts trainer.grad_accum for that, see
        hyla.jobs.elastic); another one only when trainer.allow_batch_change says so."""
        if saved["global_batch"] == self.global_batch:
            return
        if not self.cfg.trainer.allow_batch_change:
            raise ValueError(
                f"the checkpoint of step {step} of run {self.cfg.tracking.run_name!r} was "
                f"trained with a global batch of {saved['global_batch']} sequences (dp x "
                f"data.batch_size x trainer.grad_accum = {saved['dp']} x "
                f"{saved['batch_size']} x {saved['grad_accum']}), this job has "
                f"{self.global_batch}; keep the product, or set "
                f"trainer.allow_batch_change=true"
            )
        self.batch_changed_at = step
        log.warning(
            "run %s continues from step %d with a global batch of %d sequences instead of %d "
            "(trainer.allow_batch_change)",
            self.cfg.tracking.run_name,
            step,
            self.global_batch,
            saved["global_batch"],
        )

    def _resize_requested(self) -> bool:
        """Elastic runs: rank 0 looks for the driver's request, and every rank learns its
        answer at the same step."""
        if not self.cfg.cluster.elastic:
            return False
        flag = torch.zeros(1)
        if self.rank == 0:
            fs, path = fsspec.core.url_to_fs(f"{run_folder(self.cfg)}/{RESIZE_FILE}")
            flag[0] = float(fs.exists(path))
        return bool(_sum_over_world(flag)[0] > 0)

    def _recorded_run(self) -> str | None:
        """The MLflow run this job started before (in the same store), if any."""
        try:
            with fsspec.open(f"{run_folder(self.cfg)}/{TRACKING_FILE}", "r") as f:
                record = json.load(f)
        except FileNotFoundError:
            return None
        return record["run_id"] if record.get("tracking_uri") == self.tracking_uri else None

    def _record_run(self, run_id: str | None) -> None:
        record = {"run_id": run_id, "tracking_uri": self.tracking_uri}
        with fsspec.open(f"{run_folder(self.cfg)}/{TRACKING_FILE}", "w") as f:
            json.dump(record, f)

    # ---------------------------------------------------------------- the loop

    def fit(
        self,
        report: Callable[[int, dict[str, float]], None] | None = None,
        stop_at: int | None = None,
    ) -> TrainResult:
        """Train to trainer.steps (or stop early after step `stop_at`, checkpointing there:
        the schedule still spans trainer.steps, so a later run continues exactly)."""
        cfg = self.cfg
        last = cfg.trainer.steps if stop_at is None else min(stop_at, cfg.trainer.steps)
        resumed_from, run_id = self.resume()
        run_id = self.tracker.start(run_id or self._recorded_run(), cfg.flat(), _config_yaml(cfg))
        if self.rank == 0:
            self._record_run(run_id)
        if self.batch_changed_at is not None:
            self.tracker.set_tag("hyla.global_batch_changed_at_step", str(self.batch_changed_at))
        result = TrainResult(
            cfg.tracking.run_name or "",
            run_id,
            self.tracking_uri,
            self.store.url,
            resumed_from=resumed_from,
        )
        console = ProgressConsole(cfg.trainer.steps, self.step, enabled=self.rank == 0)
        status = "FAILED"
        try:
            with console:
                while self.step < last:
                    metrics = self.train_step()
                    if cfg.trainer.eval_batches and (
                        self.step % cfg.trainer.eval_every == 0 or self.step == cfg.trainer.steps
                    ):
                        metrics |= self.evaluate()
                        result.val_loss = metrics["val_loss"]
                    result.losses[self.step] = metrics["loss"]
                    self.tracker.log_metrics(metrics, self.step)
                    saved = self.step % cfg.checkpoint.every == 0 or self.step == last
                    if saved:
                        self.save(run_id)
                    console.update(self.step, metrics, log=self.step % cfg.trainer.log_every == 0)
                    if report is not None:
                        report(self.step, metrics)
                    if self._resize_requested():
                        if not saved:
                            self.save(run_id)
                        result.stopped_to_resize = True
                        break
            status = "FINISHED"
        finally:
            if result.stopped_to_resize:  # the run goes on after the restart
                self.tracker.suspend()
            else:
                self.tracker.finish(status)
        if result.losses:
            result.final_loss = result.losses[max(result.losses)]
        result.tokens_per_second = console.tokens_per_second
        return result


def _documents(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The model's doc_start argument, when the data carries document starts."""
    return {"doc_start": batch["doc_start"]} if "doc_start" in batch else {}


def _adamw(model: torch.nn.Module, cfg: JobConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms' gains, biases or gates)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.optim.lr,
        betas=(cfg.optim.betas[0], cfg.optim.betas[1]),  # two numbers (OptimConfig)
        foreach=False,  # the same kernels on every machine: bit-identical resumes
    )


def _sum_over_world(x: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x)
    return x


def _max_over_world(values: list[float]) -> list[float]:
    x = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x.tolist()


def _peak_memory(device: torch.device) -> float:
    """Bytes: the accelerator's peak allocation, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB


def _rng_states(device: torch.device) -> dict[str, Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(states: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def _config_yaml(cfg: JobConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
