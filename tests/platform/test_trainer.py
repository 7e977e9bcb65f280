"""The trainer: determinism, resume == uninterrupted, sequence/data parallelism == one
process, schedules, evaluation, MLflow continuity across a resume."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from mlflow import MlflowClient
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from hyla.parallel import parallelize
from hyla.platform import trainer as trainer_module
from hyla.platform.checkpoint import CheckpointWarning, NoLoadableCheckpointError
from hyla.platform.config import OptimConfig, compose
from hyla.platform.paths import run_storage
from hyla.platform.schedule import lr_multiplier
from hyla.platform.trainer import Trainer
from tests.parallel.launcher import run_distributed

# The tiny LGDMA model (every mixer) on 64-token sequences of the stdlib corpus.
SMALL = [
    "data.seq_len=64",
    "data.batch_size=2",
    "data.max_documents=40",
    "trainer.eval_every=3",
    "trainer.eval_batches=1",
    "checkpoint.every=3",
    "optim.warmup_steps=2",
]
ONE_STEP = ("trainer.steps=1", "optim.warmup_steps=1")  # warmup may not outlast the run


def job(tmp_path, *extra: str, name: str = "run"):
    return compose(
        [
            *SMALL,
            "parallel=none",
            f"checkpoint.dir={tmp_path}/store",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"tracking.run_name={name}",
            *extra,
        ]
    )


def test_same_config_gives_bit_identical_losses_and_learns(tmp_path):
    first = Trainer(job(tmp_path, "trainer.steps=4", name="a")).fit()
    second = Trainer(job(tmp_path, "trainer.steps=4", name="b")).fit()
    assert first.losses == second.losses  # exact, not approximate
    assert len(first.losses) == 4
    assert first.losses[4] < first.losses[1] - 0.3  # 5.55 (uniform over 258) falls fast
    assert math.isfinite(first.val_loss)


def test_resume_continues_exactly_and_in_the_same_mlflow_run(tmp_path):
    whole = Trainer(job(tmp_path, "trainer.steps=6", name="whole")).fit()
    part = Trainer(job(tmp_path, "trainer.steps=6", name="split")).fit(stop_at=3)
    resumed = Trainer(job(tmp_path, "trainer.steps=6", name="split")).fit()
    assert resumed.resumed_from == 3
    assert resumed.run_id == part.run_id
    assert {**part.losses, **resumed.losses} == whole.losses
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(
        part.run_id, "loss"
    )
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3, 4, 5, 6]


def test_schedules():
    cosine = lr_multiplier(OptimConfig(warmup_steps=4, min_lr_ratio=0.1), 20)
    assert [cosine(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine(19) == pytest.approx(0.1)
    assert all(cosine(s) >= cosine(s + 1) for s in range(3, 19))
    wsd = lr_multiplier(
        OptimConfig(schedule="wsd", warmup_steps=2, min_lr_ratio=0.0, decay_fraction=0.25), 20
    )
    assert [wsd(s) for s in range(2, 15)] == [1.0] * 13
    assert [wsd(s) for s in range(15, 20)] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])


def test_grad_accumulation_equals_a_larger_batch(tmp_path):
    # MoM's balance loss is not additive over micro-batches (it multiplies batch statistics),
    # so it is off here; everything else is a per-token mean.
    no_aux = ("model.mom_aux_weight=0", "data.shuffle=false", *ONE_STEP)
    big = Trainer(job(tmp_path, *no_aux, "data.batch_size=4"))
    accum = Trainer(
        job(tmp_path, *no_aux, "data.batch_size=2", "trainer.grad_accum=2", name="accum")
    )
    # the same 4 sequences per step, with equal token counts: equal mean losses and equal
    # accumulated gradients (their norm, before clipping), up to float32 summation order.
    # One step only: Adam's first update is about lr * sign(g), so round-off in a near-zero
    # gradient element can flip it, and later steps drift apart by more than round-off.
    one, two = big.train_step(), accum.train_step()
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-6)
    assert one["grad_norm"] == pytest.approx(two["grad_norm"], rel=1e-5)


def _parallel_losses(rank, world, tmp_path, overrides, out):
    """Train 2 steps, stop, resume from the (sharded) checkpoint for the rest."""
    cfg = job(tmp_path, *overrides, name=f"w{world}")
    first = Trainer(cfg).fit(stop_at=2)
    rest = Trainer(cfg).fit()
    if rank == 0:
        torch.save({**first.losses, **rest.losses}, out)


@pytest.mark.parametrize(
    "layout",
    [
        "parallel=sp2 parallel.sp_layout=zigzag",
        "parallel=sp2 parallel.sp_layout=contiguous",
        "parallel.dp=2",
        "parallel=sp2 parallel.data_parallel=fsdp",
        "parallel=sp2 parallel.data_parallel=fsdp model.activation_checkpointing=true",
    ],
)
def test_parallel_training_matches_one_process(tmp_path, layout):
    """sp=2 (LASP-2 / LASP-2H) on zigzag and contiguous pieces, dp=2 (half the batch each)
    and sp=2 under FSDP2 (zigzag, the default for the tiny model), also with activation
    checkpointing inside its units, give the one-process losses, also across a stop and
    resume from their checkpoints: gradients are summed over sp and averaged over dp."""
    # MoM's balance loss is computed per dp rank (over its own samples): exact under sp,
    # not under another dp split, so it is off here (tests/parallel covers it under sp).
    steps = ["trainer.steps=3", "data.batch_size=4", "model.mom_aux_weight=0"]
    single = Trainer(job(tmp_path, *steps, name="single")).fit().losses
    overrides = [*steps, *layout.split()]
    if layout == "parallel.dp=2":
        overrides = [*steps, "data.batch_size=2", "parallel.dp=2"]
    out = tmp_path / "losses.pt"
    run_distributed(_parallel_losses, 2, tmp_path, tmp_path, overrides, out)
    parallel = torch.load(out)
    assert parallel.keys() == single.keys()
    for step in single:  # float32 sums in another order: relative 1e-5 after 3 updates
        assert parallel[step] == pytest.approx(single[step], rel=1e-5)


def test_a_corrupt_newest_checkpoint_resumes_from_the_one_before(tmp_path):
    """A same-size byte flip in the newest checkpoint's weights: the rerun skips it (with a
    warning naming the file), resumes from the checkpoint before it and continues with the
    uninterrupted run's losses, bit for bit."""
    whole = Trainer(job(tmp_path, "trainer.steps=9", name="whole")).fit()
    Trainer(job(tmp_path, "trainer.steps=9", name="hurt")).fit(stop_at=6)
    shard = next((tmp_path / "store/hurt/checkpoints/step-00000006/dcp").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.warns(CheckpointWarning, match=r"step-00000006 is corrupt: dcp/__0_0.distcp"):
        resumed = Trainer(job(tmp_path, "trainer.steps=9", name="hurt")).fit()
    assert resumed.resumed_from == 3
    assert resumed.losses == {step: whole.losses[step] for step in range(4, 10)}


def test_a_run_whose_checkpoints_all_fail_stops_and_deletes_nothing(tmp_path):
    """Every COMMITTED marker truncated: the rerun does not start again from step 0 (whose
    first save used to delete the old checkpoints) but stops with NoLoadableCheckpointError
    naming the store and each checkpoint's reason, and every file is left as it was."""
    Trainer(job(tmp_path, "trainer.steps=6", name="torn")).fit()
    root = tmp_path / "store/torn/checkpoints"
    for marker in root.glob("step-*/COMMITTED"):
        marker.write_bytes(marker.read_bytes()[:40])
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    unreadable = "is corrupt: its COMMITTED marker is unreadable"
    newest, older = (f"step-0000000{step} {unreadable}" for step in (6, 3))
    reasons = rf"^no checkpoint under {root} .*{newest}.*{older}"
    with pytest.warns(CheckpointWarning), pytest.raises(NoLoadableCheckpointError, match=reasons):
        Trainer(job(tmp_path, "trainer.steps=9", name="torn")).fit()
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_zero_grad_clip_turns_clipping_off(tmp_path):
    """optim.grad_clip=0 is no clipping (it used to scale every gradient to zero): the same
    losses as a bound no gradient reaches."""
    off = Trainer(job(tmp_path, "trainer.steps=3", "optim.grad_clip=0", name="off")).fit()
    far = Trainer(job(tmp_path, "trainer.steps=3", "optim.grad_clip=1e9", name="far")).fit()
    assert off.losses == far.losses
    assert off.losses[3] < off.losses[1] - 0.3


def _train_part(rank, world, tmp_path, overrides, stop_at, out):
    result = Trainer(job(tmp_path, *overrides, name="scaled")).fit(stop_at=stop_at)
    if rank == 0:
        torch.save({"losses": result.losses, "resumed_from": result.resumed_from}, out)


@pytest.mark.parametrize(
    "then",
    [
        "parallel.sp=2 data.batch_size=4",
        "parallel.dp=4 data.batch_size=1",
        "parallel.dp=2 data.batch_size=2 parallel.data_parallel=fsdp",
        "data.batch_size=2 trainer.grad_accum=2",
    ],
)
def test_a_run_resumes_at_another_scale(tmp_path, then):
    """2 steps at dp = 2, then the rest at another dp x sp, under FSDP2, or in one process
    with gradient accumulation (the same global batch of 4): the losses of the uninterrupted
    one-process run. The model and optimizer reshard through DCP, the data continues from the
    samples consumed (tests/platform/test_sampling.py shows the same samples per step).
    Tolerance as for the parallel runs above: float32 sums in another order; MoM's balance
    loss is off, as it is computed per dp rank and per micro-batch (README)."""
    steps = ["trainer.steps=4", "model.mom_aux_weight=0"]  # per dp rank: see above
    single = Trainer(job(tmp_path, *steps, "data.batch_size=4", name="single")).fit().losses
    first = [*steps, "parallel.dp=2", "data.batch_size=2"]
    (tmp_path / "a").mkdir()
    run_distributed(_train_part, 2, tmp_path / "a", tmp_path, first, 2, tmp_path / "a.pt")
    rest = [*steps, *then.split()]
    world = 4 if "dp=4" in then else 1 if "grad_accum" in then else 2
    (tmp_path / "b").mkdir()
    if world == 1:
        _train_part(0, 1, tmp_path, rest, None, tmp_path / "b.pt")
    else:
        run_distributed(_train_part, world, tmp_path / "b", tmp_path, rest, None, tmp_path / "b.pt")
    before, after = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert after["resumed_from"] == 2
    losses = {**before["losses"], **after["losses"]}
    assert losses.keys() == single.keys()
    for step in single:
        assert losses[step] == pytest.approx(single[step], rel=1e-5), step


def test_a_resume_keeps_the_global_batch_unless_allowed(tmp_path, caplog):
    Trainer(job(tmp_path, "trainer.steps=4", "data.batch_size=4", name="gb")).fit(stop_at=2)
    with pytest.raises(ValueError, match=r"global batch of 4 sequences .* this job has 2"):
        Trainer(job(tmp_path, "trainer.steps=4", "data.batch_size=2", name="gb")).fit()
    allowed = job(
        tmp_path,
        "trainer.steps=4",
        "data.batch_size=2",
        "trainer.allow_batch_change=true",
        name="gb",
    )
    with caplog.at_level("WARNING", logger="hyla.platform.trainer"):
        result = Trainer(allowed).fit()
    assert result.resumed_from == 2 and "instead of 4" in caplog.text
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(result.run_id)
    assert run.data.tags["hyla.global_batch_changed_at_step"] == "2"


def _bf16_losses(rank, world, tmp_path, overrides, out):
    losses = Trainer(job(tmp_path, *overrides, name="bf16-sp")).fit().losses
    if rank == 0:
        torch.save(losses, out)


@pytest.mark.parametrize("parallel", ["parallel=none", "parallel=sp2"])
def test_bf16_autocast_trains(tmp_path, parallel):
    """trainer.precision=bf16 trains, on one process and under sequence parallelism (the
    default job's sp2, whose LASP-2 kernels once ran under the caller's autocast)."""
    fp32 = Trainer(job(tmp_path, "trainer.steps=2", name="fp32")).fit().losses
    overrides = ["trainer.steps=2", "trainer.precision=bf16", parallel]
    if parallel == "parallel=none":
        bf16 = Trainer(job(tmp_path, *overrides, name="bf16")).fit().losses
    else:
        out = tmp_path / "losses.pt"
        run_distributed(_bf16_losses, 2, tmp_path, tmp_path, overrides, out)
        bf16 = torch.load(out)
    assert bf16.keys() == fp32.keys()
    for step, loss in fp32.items():  # bf16 matmuls: about 3 significant digits
        assert bf16[step] == pytest.approx(loss, rel=2e-2)


def test_document_masking_reaches_the_model(tmp_path):
    """With data.document_masking the batches carry doc_start and the model uses it: with
    short documents the first loss (same weights, same batch) changes, since tokens stop
    seeing other documents."""
    for i in range(40):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n")
    short = (f"data.source={tmp_path}/doc*.txt", "data.val_sequences=1", "data.val_fraction=0.5")
    short += ONE_STEP
    plain = Trainer(job(tmp_path, *short, name="plain")).train_step()
    masked = Trainer(job(tmp_path, *short, "data.document_masking=true", name="masked"))
    assert masked.train_set[0]["doc_start"].sum() > 1
    loss = masked.train_step()["loss"]
    assert math.isfinite(loss) and loss != pytest.approx(plain["loss"], rel=1e-4)


def test_no_evaluation_with_zero_eval_batches(tmp_path):
    """trainer.eval_batches=0: no validation metric at any step, also not the last."""
    cfg = job(tmp_path, "trainer.steps=3", "trainer.eval_batches=0")
    result = Trainer(cfg).fit()
    assert math.isnan(result.val_loss)
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(
        result.run_id, "val_loss"
    )
    assert history == []
    assert len(result.losses) == 3


def test_mqar_evaluation_reports_accuracy(tmp_path):
    cfg = job(
        tmp_path,
        "data=mqar",
        "data.seq_len=64",
        "data.mqar_pairs=4",
        "data.val_sequences=4",
        *ONE_STEP,
    )
    metrics = Trainer(cfg).evaluate()
    assert 0.0 <= metrics["val_accuracy"] <= 1.0
    assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]))


def test_checkpoints_live_under_the_run(tmp_path):
    cfg = job(tmp_path, "trainer.steps=4", "checkpoint.keep_last=1")
    result = Trainer(cfg).fit()
    assert result.checkpoint_url == run_storage(cfg) == f"{tmp_path}/store/run/checkpoints"
    trainer = Trainer(cfg)
    assert trainer.store.steps() == [4]


def test_a_resume_on_other_data_is_refused_unless_allowed(tmp_path, caplog):
    """The checkpoint records what its data position counts: another seq_len would map it
    onto other samples. How many validation sequences are read does not change the training
    samples (they come from other documents): that resume is taken."""
    Trainer(job(tmp_path, "trainer.steps=4", name="data")).fit(stop_at=2)
    fewer_val = job(tmp_path, "trainer.steps=4", "data.val_sequences=2", name="data")
    assert Trainer(fewer_val).fit(stop_at=3).resumed_from == 2
    other = job(tmp_path, "trainer.steps=4", "data.seq_len=32", name="data")
    with pytest.raises(ValueError, match=r"trained on other data \(seq_len differ"):
        Trainer(other).fit()
    allowed = job(tmp_path, "trainer.steps=4", "data.seq_len=32", name="data")
    allowed.data.allow_data_change = True
    with caplog.at_level(logging.WARNING):
        assert Trainer(allowed).fit().resumed_from == 3
    assert "on other data (seq_len differ" in caplog.text


def test_the_trainer_applies_its_training_policies_in_one_parallelize_call(tmp_path, monkeypatch):
    """The trainer builds the model and hands it to parallelize once; what it trains is what
    parallelize returned (here with activation checkpointing, which the model no longer
    applies itself)."""
    calls = []

    def counted(*args):
        calls.append(args)
        return parallelize(*args)

    monkeypatch.setattr(trainer_module, "parallelize", counted)
    trainer = Trainer(job(tmp_path, "model.activation_checkpointing=true"))
    assert len(calls) == 1 and calls[0][0] is trainer.model
    assert trainer.wrapped is trainer.model  # one process: no data-parallel wrapper
    assert all(isinstance(block, CheckpointWrapper) for block in trainer.model.blocks)
