"""`hyla bench --quick`: both benchmarks run for real and write their JSON and PNG plots."""

from __future__ import annotations

import json

import matplotlib.image
import pytest

from hyla.jobs.cli import main


def test_quick_bench_writes_json_and_plots(tmp_path, capsys):
    assert main(["bench", "--quick", "--out", str(tmp_path)]) == 0
    assert "wrote kernels.json" in capsys.readouterr().out

    kernels = json.loads((tmp_path / "kernels.json").read_text())
    assert {"device", "dtype", "tokens", "date", "machine", "torch"} <= set(kernels["config"])
    rows = kernels["results"]
    assert {r["op"] for r in rows} == {
        "linear_attn",
        "linear_attn (const gate)",
        "linear_attn (gate)",
        "gla",
        "gated_delta_rule",
        "flash_attention (causal)",
        "sdpa (causal)",
    }
    assert {r["seq_len"] for r in rows} == {64, 128}
    for r in rows:
        assert r["skipped"] is None, r
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
        assert r["batch"] * r["seq_len"] == 256
        # each row's rate as a fraction of a matmul timed beside it
        assert r["matmul_gflops"] > 0 and r["fwd_bwd_gflop"] > r["fwd_gflop"] > 0
        expected = r["fwd_bwd_gflop"] / (r["fwd_bwd_ms"] / 1e3) / r["matmul_gflops"]
        assert r["fwd_bwd_of_matmul"] == pytest.approx(expected, rel=1e-6)

    sp = json.loads((tmp_path / "sequence_parallel.json").read_text())
    assert {"date", "machine", "torch"} <= set(sp["meta"])
    by_method = {r["method"]: r for r in sp["rows"]}
    assert set(by_method) == {"none", "lasp2", "lasp1", "ulysses"}
    for r in sp["rows"]:
        assert r["length"] == 512 and r["step_seconds"] > 0 and r["peak_mib_per_rank"] > 0
    assert by_method["none"]["bytes_per_rank"] == 0
    # LASP-2 sends fixed-size states; Ulysses sends every token's q, k, v and output
    assert 0 < by_method["lasp2"]["bytes_per_rank"] < by_method["ulysses"]["bytes_per_rank"]

    for name in ("kernels.png", "sequence_parallel.png"):
        image = matplotlib.image.imread(tmp_path / name)
        assert image.shape[0] > 200 and image.shape[1] > 400, (name, image.shape)
        assert image.std() > 0.01  # something is drawn


def test_only_one_benchmark(tmp_path):
    args = ["bench", "--quick", "--only", "kernels", "--seq-lens", "64", "--out", str(tmp_path)]
    assert main(args) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernels.json", "kernels.png"]
    rows = json.loads((tmp_path / "kernels.json").read_text())["results"]
    assert {r["seq_len"] for r in rows} == {64}  # the user's sizes override --quick's


def test_bad_sizes_are_rejected(tmp_path, capsys):
    assert main(["bench", "--quick", "--seq-lens", "0", "--out", str(tmp_path)]) == 2
    assert "hyla: error: --seq-lens must be >= 1" in capsys.readouterr().err
    assert main(["bench", "--worlds", "0", "--out", str(tmp_path)]) == 2
    assert "hyla: error: --worlds must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--worlds must be >= 1"):  # the traceback on request
        main(["--debug", "bench", "--worlds", "0", "--out", str(tmp_path)])
