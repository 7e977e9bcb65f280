"""Composing and validating the job config."""

from __future__ import annotations

import pytest

from hyla.jobs.training_job import resume_config
from hyla.models.presets import preset_names
from hyla.parallel import ArgumentError, ParallelDims, SequenceLayout, check_method, check_supports
from hyla.platform.config import compose, from_dict, with_overrides


def test_defaults():
    cfg = compose()
    assert (cfg.model.name, cfg.parallel.sp, cfg.data.source) == ("tiny", 2, "stdlib")
    assert cfg.parallel.world_size == 2
    flat = cfg.flat()
    assert flat["model.d_model"] == 64 and flat["optim.betas"] == [0.9, 0.95]
    assert from_dict(cfg.to_dict()) == cfg  # what workers rebuild from the shipped dict


@pytest.mark.parametrize("preset", preset_names())
def test_every_model_preset_composes(preset):
    assert compose([f"model={preset}", "parallel=none"]).model.name == preset


def test_overrides():
    cfg = compose(
        [
            "parallel=sp4",
            "parallel.dp=2",
            "data=mqar",
            "trainer.steps=7",
            "optim.warmup_steps=7",
            "optim.schedule=wsd",
            "checkpoint.dir=memory://ckpt",
        ]
    )
    assert (cfg.parallel.world_size, cfg.data.source, cfg.trainer.steps) == (8, "mqar", 7)
    assert (cfg.optim.schedule, cfg.checkpoint.dir) == ("wsd", "memory://ckpt")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model=huge"], r"model must be one of \[.*'tiny'\], got 'huge'"),
        (["parallel=sp3"], r"parallel must be one of \['none', 'sp2', 'sp4'\], got 'sp3'"),
        (
            ["data.seq_len=3"],
            r"data.seq_len must be >= the 4 pieces of a zigzag layout over parallel.sp = 2 "
            r"ranks, got 3",
        ),
        (
            ["parallel.sp_layout=spiral"],
            r"parallel.sp_layout must be one of \('auto', 'contiguous', 'zigzag'\), got 'spiral'",
        ),
        (
            ["parallel.sp_method=lasp1", "parallel.sp_layout=zigzag"],
            r"parallel.sp_method='lasp1' does not support a zigzag layout",
        ),
        (["parallel.sp_method=ulysses"], r"'ulysses' does not support MoM layers"),
        (
            ["parallel.sp_method=ulysses", "model.layers=LA", "data.document_masking=true"],
            r"'ulysses' does not support document masking",
        ),
        (
            ["parallel=sp4", "parallel.sp_method=ulysses", "model.layers=LA", "model.n_heads=2"],
            r"'ulysses' needs every head count to divide by .* parallel.sp = 4, got head "
            r"counts \[2, 2\]",
        ),
        (["model.foo=1"], r"unknown keys \['model.foo'\]; allowed: \['activation_checkpointing'"),
        (["+model.foo=1"], r"unknown keys \['model.foo'\]; allowed: \['activation_checkpointing'"),
        (["trainer.steps=0"], r"trainer.steps must be an integer >= 1, got 0"),
        (
            ["trainer.steps=5"],
            r"^optim.warmup_steps must be <= trainer.steps \(the run would never reach "
            r"optim.lr\), got optim.warmup_steps=10 and trainer.steps=5$",
        ),
        (["trainer.eval_batches=-1"], r"trainer.eval_batches must be an integer >= 0, got -1"),
        (
            ["optim.schedule=linear"],
            r"optim.schedule must be one of \('cosine', 'wsd'\), got 'linear'",
        ),
        (["optim.lr=-1"], r"optim.lr must be a number > 0.0, got -1"),
        (["parallel.sp_method=ring"], r"parallel.sp_method must be one of \('lasp2', 'lasp1', "),
        (["model.n_heads=5"], r"model.n_heads must divide model.d_model, got n_heads=5"),
        (
            ["trainer.precision=fp8"],
            r"trainer.precision must be one of \('fp32', 'bf16'\), got 'fp8'",
        ),
    ],
)
def test_bad_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        compose(overrides)


def test_warmup_is_checked_against_the_steps_being_run():
    """A resume may raise trainer.steps past a warmup the saved run could not finish, and
    lowering it below the warmup is refused; warmup == steps peaks at the last step."""
    assert compose(["trainer.steps=10"]).optim.warmup_steps == 10
    saved = compose(["trainer.steps=4", "optim.warmup_steps=4"])
    raised = with_overrides(saved, ["trainer.steps=400", "optim.warmup_steps=10"])
    assert (raised.trainer.steps, raised.optim.warmup_steps) == (400, 10)
    with pytest.raises(ValueError, match=r"got optim.warmup_steps=4 and trainer.steps=3$"):
        with_overrides(saved, ["trainer.steps=3"])


def test_world_size_must_match():
    cfg = compose(["parallel=sp2", "parallel.dp=2"])
    assert cfg.parallel_dims(4) == ParallelDims(dp=2, sp=2, world_size=4)
    with pytest.raises(
        ValueError,
        match=r"^the world size must equal parallel.dp x parallel.sp = 2 x 2 = 4, got 3$",
    ):
        cfg.parallel_dims(3)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.shuffle=maybe"], r"data.shuffle must be true or false, got 'maybe'"),
        (["tracking.system_metrics=1"], r"tracking.system_metrics must be true or false, got 1"),
        (["trainer.compile=yes"], r"trainer.compile must be true or false, got 'yes'"),
        (["optim.lr=inf"], r"optim.lr must be a finite number, got inf"),
        (["optim.weight_decay=nan"], r"optim.weight_decay must be a finite number, got nan"),
        (["model.layers=123"], r"model.layers must be a string or a list of strings, got 123"),
        (
            ["optim.betas=[0.9,abc]"],
            r"optim.betas must be a list of finite numbers, got \[0.9, 'abc'\]",
        ),
        (["data.num_workers=abc"], r"data.num_workers must be an integer, got 'abc'"),
        (["trainer.seed=abc"], r"trainer.seed must be an integer, got 'abc'"),
        (["model.vocab_size=300.5"], r"model.vocab_size must be an integer, got 300.5"),
        (["trainer.steps=true"], r"trainer.steps must be an integer, got True"),
        (["data.max_documents=1.5"], r"data.max_documents must be an integer or null, got 1.5"),
    ],
)
def test_every_value_is_type_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        compose(overrides)


@pytest.mark.parametrize(
    "name",
    [
        "..",
        ".",
        "../escaped",
        "a/b",
        "/abs",
        "~",
        "~user",
        "a:b",
        "a%2Fb",
        "a?b",
        "a#b",
        "",
        "x" * 101,
    ],
)
@pytest.mark.parametrize("storage", ["runs", "s3://bucket/runs"])
def test_run_names_are_one_safe_path_segment(name, storage):
    with pytest.raises(ValueError, match=r"tracking.run_name must be 1 to 100 letters"):
        compose([f"tracking.run_name='{name}'", f"checkpoint.dir={storage}"])
    with pytest.raises(ValueError, match=r"the run to resume must be 1 to 100 letters"):
        resume_config(name, [], storage)
    assert compose([f"checkpoint.dir={storage}", "tracking.run_name=exp-1.b_2"])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["cluster.min_workers=2"], r"set together .* got 2 and None"),
        (
            ["cluster.min_workers=4", "cluster.max_workers=2"],
            r"cluster.max_workers must be an integer >= 4, got 2",
        ),
        (
            ["cluster.min_workers=1", "cluster.max_workers=4"],
            r"cluster.min_workers must be a multiple of parallel.sp = 2 .*, got 1",
        ),
        (
            [
                "parallel=none",
                "data.batch_size=3",
                "cluster.min_workers=2",
                "cluster.max_workers=2",
            ],
            r"no dp between .* \(2..2\) divides the global batch of 3 .* \[1, 3\]",
        ),
    ],
)
def test_bad_elastic_bounds(overrides, message):
    with pytest.raises(ValueError, match=message):
        compose(overrides)


def test_elastic_dps_keep_the_global_batch():
    base = ["parallel=none", "parallel.dp=4", "data.batch_size=3"]  # global batch 12
    cfg = compose(base)
    bounded = compose([*base, "cluster.min_workers=1", "cluster.max_workers=5"])
    assert cfg.global_batch == 12 and bounded.elastic_dps() == [1, 2, 3, 4]


def test_zero_grad_clip_means_no_clipping():
    assert compose(["optim.grad_clip=0"]).optim.grad_clip == 0


@pytest.mark.parametrize(
    "overrides,layout",
    [
        ([], "zigzag"),  # tiny LGDMA has attention, lasp2: balance it
        (["model.layers=LGD"], "contiguous"),  # no attention: nothing to balance
        (["parallel.sp_method=lasp1"], "contiguous"),  # the ring runs contiguous only
        (["parallel=none"], "contiguous"),
        (["model.layers=LGD", "parallel.sp_layout=zigzag"], "zigzag"),  # asked for
    ],
)
def test_auto_layout(overrides, layout):
    assert compose(overrides).parallel.sp_layout == layout


def test_unknown_section():
    with pytest.raises(ValueError, match=r"unknown config sections \['optimizer'\]"):
        from_dict({**compose().to_dict(), "optimizer": {}})


def test_scale_1m_experiment():
    """`hyla train +experiment=scale-1m`: a million tokens over 4 ranks, 1/4 attention."""
    cfg = compose(["+experiment=scale-1m"])
    assert cfg.data.seq_len == 2**20 and cfg.parallel.sp == 4
    assert cfg.parallel.sp_layout == "zigzag"
    assert cfg.model.activation_checkpointing
    assert cfg.model.layers.count("A") * 4 == len(cfg.model.layers)
    assert {"L", "M"} <= set(cfg.model.layers)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim.lr=0"], r"optim.lr must be a number > 0.0, got 0"),
        (["tracking.experiment=''"], r"tracking.experiment must be an MLflow experiment name"),
        (
            ["trainer.seed=17592186044416"],
            r"trainer.seed must be in \[0, 2\*\*32\), got 17592186044416",
        ),
        (["trainer.seed=-1"], r"trainer.seed must be an integer >= 0, got -1"),
        (["cluster.cpus_per_worker=0"], r"cluster.cpus_per_worker must be a number > 0.0, got 0"),
        (["checkpoint.dir=''"], r"checkpoint.dir must be a path or fsspec URL, not empty"),
    ],
)
def test_values_that_used_to_slip_through(overrides, message):
    with pytest.raises(ValueError, match=message):
        compose(overrides)


@pytest.mark.parametrize(
    "name", ["mlflow.db", "mlflow.db-journal", "mlartifacts", "mlruns", "ray", "data-cache"]
)
def test_run_names_the_storage_root_uses_are_refused(name):
    with pytest.raises(ValueError, match=r"tracking.run_name .* none of .*, got"):
        compose([f"tracking.run_name={name}"])


@pytest.mark.parametrize("name", ["-rf", "_x", ".hidden", "-"])
def test_run_names_start_with_a_letter_or_digit(name):
    with pytest.raises(ValueError, match=r"starting with a letter or digit"):
        compose([f"tracking.run_name='{name}'"])


def test_edge_values_still_pass():
    assert compose(["trainer.seed=4294967295"]).trainer.seed == 2**32 - 1
    assert compose(["cluster.cpus_per_worker=0.5", "tracking.run_name=0run"])


@pytest.mark.parametrize(
    "overrides,check,own,keyed",
    [
        (
            ["parallel.sp_method=ring"],
            lambda: check_method("ring"),
            "method must be one of ('lasp2', 'lasp1', 'ulysses'), got 'ring'",
            "parallel.sp_method must be one of ('lasp2', 'lasp1', 'ulysses'), got 'ring'",
        ),
        (
            ["parallel.sp_method=lasp1", "parallel.sp_layout=zigzag"],
            lambda: check_supports("lasp1", "zigzag"),
            "method='lasp1' does not support a zigzag layout (the ring passes states in rank "
            "order); use layout='contiguous' or method='lasp2'",
            "parallel.sp_method='lasp1' does not support a zigzag layout (the ring passes states "
            "in rank order); use parallel.sp_layout='contiguous' or parallel.sp_method='lasp2'",
        ),
        (
            ["data.seq_len=3"],
            lambda: SequenceLayout.even("zigzag", 3, 2),
            "length must be >= the 4 pieces of a zigzag layout over world = 2 ranks, got 3",
            "data.seq_len must be >= the 4 pieces of a zigzag layout over parallel.sp = 2 "
            "ranks, got 3",
        ),
    ],
)
def test_parallel_errors_name_the_config_keys(overrides, check, own, keyed):
    """hyla.parallel names its own arguments; the config check that runs the same check
    says the same in one line naming the config keys."""
    with pytest.raises(ArgumentError) as raised:
        check()
    assert str(raised.value) == own
    with pytest.raises(ValueError) as raised:
        compose(overrides)
    assert str(raised.value) == keyed
