"""`hyla bench`: the kernel and sequence-parallel benchmarks, as JSON and PNG plots.

    hyla bench                     # the full sizes of both scripts (minutes on CPU)
    hyla bench --quick --out /tmp/bench

It runs the repository's benchmarks/kernels.py (chunk kernels against causal softmax
attention: time against T, log-log) and benchmarks/sequence_parallel.py (LASP-2, the
LASP-1 ring and Ulysses: step time and bytes sent per rank), each in its own process, and
writes into --out:

    kernels.json, kernels.png, sequence_parallel.json, sequence_parallel.png
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
OUTPUTS = ("kernels.json", "kernels.png", "sequence_parallel.json", "sequence_parallel.png")
# --quick: tiny sizes, seconds of compute (the test's setting)
QUICK_KERNELS = ["--seq-lens", "64", "128", "--tokens", "256", "--heads", "2"]
QUICK_KERNELS += ["--head-k", "16", "--head-v", "16", "--warmup", "0", "--repeats", "1"]
QUICK_SP = ["--lengths", "512", "--worlds", "2", "--heads", "2", "--dim", "16", "--repeats", "1"]


def add_commands(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser(
        "bench",
        help="run the kernel and sequence-parallel benchmarks (JSON and PNG plots)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--out", type=Path, default=BENCHMARKS / "results", help="output folder")
    bench.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    bench.add_argument(
        "--only", choices=("kernels", "sequence_parallel"), help="run one benchmark only"
    )
    bench.add_argument("--seq-lens", type=int, nargs="+", help="kernel benchmark T values")
    bench.add_argument("--tokens", type=int, help="kernel benchmark B * T")
    bench.add_argument("--device", choices=("cpu", "cuda"), help="kernel benchmark device")
    bench.add_argument("--lengths", type=int, nargs="+", help="sequence-parallel T values")
    bench.add_argument("--worlds", type=int, nargs="+", help="sequence-parallel group sizes")
    bench.set_defaults(func=run_bench)


def _options(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    """The script options the user set: --name value [value ...]."""
    out: list[str] = []
    for name in names:
        value = getattr(args, name.replace("-", "_"))
        if value is not None:
            out += [f"--{name}", *map(str, value if isinstance(value, list) else [value])]
    return out


def _check(args: argparse.Namespace) -> None:
    for name in ("seq_lens", "lengths", "worlds"):
        values = getattr(args, name)
        if values is not None and min(values) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {values}")
    if args.tokens is not None and args.tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {args.tokens}")
    if not BENCHMARKS.is_dir():
        raise ValueError(
            f"hyla bench runs the repository's benchmark scripts, expected in {BENCHMARKS}; "
            "run it from a source checkout (pip install -e .)"
        )


def run_bench(args: argparse.Namespace) -> int:
    _check(args)
    args.out.mkdir(parents=True, exist_ok=True)
    kernels = (QUICK_KERNELS if args.quick else []) + _options(
        args, ("seq-lens", "tokens", "device")
    )
    sp = (QUICK_SP if args.quick else []) + _options(args, ("lengths", "worlds"))
    runs = {
        "kernels": ["kernels.py", *kernels, "--out", str(args.out / "kernels.json")],
        "sequence_parallel": [
            "sequence_parallel.py",
            *sp,
            "--out",
            str(args.out / "sequence_parallel.json"),
        ],
    }
    for name, (script, *options) in runs.items():
        if args.only in (None, name):
            # later options win in argparse: the user's sizes override --quick's
            subprocess.run([sys.executable, str(BENCHMARKS / script), *options], check=True)
    expected = [f for f in OUTPUTS if args.only is None or f.startswith(args.only)]
    missing = [f for f in expected if not (args.out / f).is_file()]
    if missing:
        print(f"hyla bench: missing outputs {missing} in {args.out}", file=sys.stderr)
        return 1
    print(f"hyla bench: wrote {', '.join(expected)} in {args.out}")
    return 0
