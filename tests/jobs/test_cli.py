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
