import pytest

from hyla.jobs.cli import main, parse


def test_demo_runs_and_checks_every_kernel(capsys):
    assert (
        main(["demo", "--seq-len", "200", "--heads", "2", "--head-dim", "16", "--check-len", "80"])
        == 0
    )
    out = capsys.readouterr().out
    for name in ("linear attention", "lightning", "scalar gate", "GLA", "gated delta rule"):
        assert name in out
    assert "all kernels match the recurrence" in out


def test_the_parser_imports_no_torch():
    """`hyla --help` and the cluster commands' parsing stay fast: building the parser imports
    none of torch, ray, mlflow or hydra (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys; from hyla.jobs.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'hydra') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_overrides_may_follow_options():
    args = parse(["resume", "r1", "a.b=1", "--storage", "X", "trainer.steps=5"])
    assert (args.run, args.storage, args.overrides) == ("r1", "X", ["a.b=1", "trainer.steps=5"])
    with pytest.raises(SystemExit) as exited:
        parse(["resume", "r1", "--storage", "X", "--nope"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit):
        parse(["sync", "r1", "extra"])


def test_sync_of_a_run_that_does_not_exist_is_an_error(tmp_path, capsys):
    assert main(["sync", "nosuchrun", "--storage", str(tmp_path)]) == 2
    assert "there is no run 'nosuchrun'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
