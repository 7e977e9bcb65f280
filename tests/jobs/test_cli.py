from hyla.jobs.cli import main


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
