"""infra/: what this machine can check without Docker, a cloud or Kubernetes.

The configs are checked by the real parsers that consume them where those exist here: Ray's
own cluster-config validation, hyla's CLI parser and config composition. The MLflow script
really starts a server.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import NamedTuple
from urllib.error import URLError
from urllib.parse import urlsplit

import psutil
import pytest
import torch
import yaml
from mlflow import MlflowClient
from packaging.version import Version

from hyla.jobs.cli import build_parser, command_names
from hyla.platform.config import CONFIG_DIR, JobConfig, compose

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
TOKEN_AUTH_RAY = Version("2.52.0")  # the first Ray with token authentication


def _yaml(name: str) -> dict:
    return yaml.safe_load((INFRA / name).read_text())


# ---- every `hyla ...` command that infra/ runs or shows


def _code(path: Path) -> Iterator[str]:
    """The lines of `path` that are code: commands, config values and usage examples (comment
    lines indented by three spaces), not prose. In markdown: indented blocks and `spans`."""
    text = path.read_text()
    if path.suffix == ".md":
        for line in text.splitlines():
            if line.startswith("    "):
                yield line
            else:
                yield from re.findall(r"`([^`]+)`", line)
        return
    for line in re.sub(r"\\\n", " ", text).splitlines():
        stripped = line.strip()
        if stripped.startswith("#   "):
            yield re.sub(r"\s#\s.*$", "", stripped[1:])
        elif not stripped.startswith("#"):
            yield re.sub(r"\s#\s.*$", "", line)


# `hyla` as a word of its own (not hyla/, hyla-src, ./hyla), then its arguments up to the end
# of that shell command
HYLA_COMMAND = re.compile(r"(?<![\w./-])hyla[ \t]+([^`;&|)\n]+)")


def hyla_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of each hyla command in infra/."""
    found = []
    for path in sorted(INFRA.iterdir()):
        for line in _code(path):
            for match in HYLA_COMMAND.finditer(line):
                argv = shlex.split(match.group(1))
                if argv and re.fullmatch(r"[a-z][a-z-]*", argv[0]):
                    found.append((f"{path.name}: hyla {match.group(1).strip()}", argv))
    return found


def _overrides(argv: list[str]) -> list[str]:
    return [word for word in argv[1:] if "=" in word and not word.startswith("-")]


def _check_command(where: str, argv: list[str]) -> JobConfig:
    """argv parses with the real `hyla` parser (when it has arguments) and its overrides
    compose into a valid job config."""
    assert argv[0] in command_names(), f"{where}: no `hyla {argv[0]}` subcommand"
    if len(argv) > 1:
        try:
            build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: `hyla` rejects these arguments")
    return compose(_overrides(argv))


def test_every_hyla_command_in_infra_is_real_and_its_overrides_compose():
    commands = hyla_commands()
    assert {"train", "submit"} <= {argv[0] for _, argv in commands}, commands
    for where, argv in commands:
        _check_command(where, argv)


def _example(file: str, subcommand: str) -> JobConfig:
    matches = [(w, a) for w, a in hyla_commands() if w.startswith(file) and a[0] == subcommand]
    assert len(matches) == 1, matches
    return _check_command(*matches[0])


def _shared_storage(cfg: JobConfig) -> bool:
    return urlsplit(cfg.checkpoint.dir).scheme not in ("", "file", "memory")


# ---- the Ray cluster launcher config


def test_ray_cluster_yaml_is_valid_for_the_ray_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _yaml("ray-cluster.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "docker"):
        assert key in raw, key
    validate_config(prepare_config(raw))  # Ray's own schema and checks, as `ray up` runs them

    types = raw["available_node_types"]
    assert raw["head_node_type"] in types
    gpus = sum(t.get("max_workers", 0) * t["resources"].get("GPU", 0) for t in types.values())
    assert gpus > 0, "no GPU worker type"
    assert raw["docker"]["image"]

    # the example job fits the cluster, and with several nodes its checkpoints are shared
    example = _example("ray-cluster.yaml", "submit")
    assert example.cluster.use_gpu
    assert example.parallel.world_size <= gpus
    assert _shared_storage(example)


def test_ray_cluster_yaml_secure_defaults():
    raw = _yaml("ray-cluster.yaml")
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(raw["docker"]["run_options"])
    assert "~/.ray/auth_token" in raw["file_mounts"]  # the token reaches every node


# ---- the KubeRay RayJob


def _ray_containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [group["template"]["spec"]["containers"][0] for group in groups]


def test_kuberay_rayjob_manifest():
    job = _yaml("kuberay-rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]

    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["hyla", "train"]
    cfg = _check_command("kuberay-rayjob.yaml entrypoint", argv[1:])

    head = cluster["headGroupSpec"]
    workers = cluster["workerGroupSpecs"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    for group in (head, *workers):
        params = group["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), params  # map[string]string

    containers = _ray_containers(cluster)
    assert len({c["image"] for c in containers}) == 1  # one image everywhere
    for container in containers:
        assert "MLFLOW_TRACKING_URI" in {e["name"] for e in container["env"]}

    # token auth: KubeRay puts RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (from the Secret) on
    # every Ray container and on the submitter
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["authOptions"]["secretName"]
    assert Version(cluster["rayVersion"]) >= TOKEN_AUTH_RAY

    # the GPUs asked for are exactly the job's world size, and two pods share storage
    gpus = 0
    for group in workers:
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
        gpus += group["replicas"] * int(resources["limits"]["nvidia.com/gpu"])
    assert cfg.cluster.use_gpu
    assert cfg.parallel.world_size == gpus
    assert sum(group["replicas"] for group in workers) > 1
    assert _shared_storage(cfg)


# ---- the Dockerfile


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and ARG defaults substituted."""
    args: dict[str, str] = {}
    out = []
    for line in re.sub(r"\\\n", " ", (INFRA / "Dockerfile").read_text()).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
        elif op == "FROM":
            rest = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest)
        out.append((op, rest.strip()))
    return out


def _pip_installs(run: str) -> list[list[str]]:
    """The arguments of each `pip install` in one RUN, without options and shell expansions."""
    out = []
    for step in run.split("&&"):
        words = shlex.split(step)
        if words[:2] == ["pip", "install"]:
            out.append([w for w in words[2:] if not w.startswith("-") and "$" not in w])
    return out


def _pins() -> tuple[str, str]:
    """torch==X from scripts/setup.sh, triton==Y from pyproject.toml."""
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    torch = re.search(r"^TORCH_VERSION=(\S+)$", setup, re.MULTILINE)
    triton = re.findall(r'"triton==([\w.]+)', (ROOT / "pyproject.toml").read_text())
    assert torch and len(triton) == 1, "the pins moved: update this test"
    return f"torch=={torch.group(1)}", f"triton=={triton[0]}"


def test_dockerfile_installs_pinned_torch_then_the_project_from_pyproject():
    steps = _instructions()
    ops = [op for op, _ in steps]
    assert "nvidia/cuda:" in steps[ops.index("FROM")][1]

    installs = [
        (i, words)
        for i, (op, run) in enumerate(steps)
        if op == "RUN"
        for words in _pip_installs(run)
    ]
    named = {w for _, words in installs for w in words if w != "."}
    assert named == set(_pins()), "only torch and triton are named, pinned as the project pins them"

    torch_at = next(i for i, words in installs if any(w.startswith("torch==") for w in words))
    project_at = next(i for i, words in installs if words == ["."])
    assert "--constraint=constraints.txt" in shlex.split(steps[project_at][1])  # the lock
    copies = [(i, shlex.split(rest)) for i, (op, rest) in enumerate(steps) if op == "COPY"]
    pyproject_at = next(i for i, words in copies if "pyproject.toml" in words)
    assert torch_at < pyproject_at < project_at  # torch first, so `pip install .` keeps it
    assert steps[pyproject_at][1].split()[-1] in (".", "./")  # into the directory installed

    sources = _copied()
    assert {"pyproject.toml", "hyla"} <= sources
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
    for source in sources:  # the build context keeps what the Dockerfile copies
        assert f"!{source}" in ignore or f"!{source}/" in ignore, source

    user = [rest for op, rest in steps if op == "USER"]
    assert user and user[-1] not in ("root", "0")


def _copied() -> set[str]:
    """The paths, relative to the build context, that the Dockerfile COPYs."""
    copies = [shlex.split(rest) for op, rest in _instructions() if op == "COPY"]
    return {w for words in copies for w in words[:-1] if not w.startswith("--")}


def test_what_the_dockerfile_copies_builds_hyla_with_its_configs(tmp_path):
    """`pip install .` in the image sees only the copied files: they must make a complete
    hyla wheel, configs included."""
    context = tmp_path / "context"
    for source in _copied():
        if (ROOT / source).is_dir():
            ignore = shutil.ignore_patterns("__pycache__")  # as the .dockerignore does
            shutil.copytree(ROOT / source, context / source, ignore=ignore)
        else:
            context.mkdir(exist_ok=True)
            shutil.copy2(ROOT / source, context / source)
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    result = subprocess.run([*build, "-w", str(dist), str(context)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (wheel,) = dist.glob("hyla-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {
        f"hyla/configs/{p.relative_to(CONFIG_DIR).as_posix()}" for p in CONFIG_DIR.rglob("*.yaml")
    }
    assert "hyla/configs/train.yaml" in configs
    assert configs <= names


# ---- scripts and bindings


def test_scripts_pass_bash_syntax_check():
    scripts = sorted([*INFRA.glob("*.sh"), *(ROOT / "scripts").glob("*.sh")])
    assert scripts
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, (script.name, result.stderr)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_gpu_check_refuses_without_a_gpu(tmp_path):
    """Without a CUDA device the GPU check stops before running anything, saying so, rather
    than passing with every gpu test skipped."""
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert result.returncode == 2, result.stderr
    assert "no CUDA device" in result.stderr
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("script", ["kernels.py", "decode.py"])
def test_gpu_check_benchmarks_take_its_arguments(script: str):
    """Each benchmark the GPU check runs accepts the --device and --out it passes."""
    check = (ROOT / "scripts" / "gpu-check.sh").read_text()
    assert f"benchmarks/{script} --device cuda --out" in check
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "--device" in result.stdout and "--out" in result.stdout


def test_all_interfaces_only_as_a_commented_opt_in():
    """Every 0.0.0.0 in infra/ has "opt-in" on its line or in the comment block above it."""
    seen = 0
    for path in sorted(INFRA.iterdir()):
        lines = path.read_text().splitlines()
        for n, line in enumerate(lines):
            if "0.0.0.0" not in line:
                continue
            seen += 1
            context = [line]
            above = n - 1
            while above >= 0 and lines[above].strip().startswith("#"):
                context.append(lines[above])
                above -= 1
            assert any("opt-in" in text for text in context), f"{path.name}:{n + 1}: {line}"
    assert seen  # the KubeRay head does listen on its pod's interfaces


# ---- the MLflow server script really runs


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def _mlflow_server(settings: dict[str, str], cwd: Path) -> Iterator[subprocess.Popen]:
    """Runs infra/mlflow-server.sh with `settings` in a new session; stops that process group."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(settings)
    cwd.mkdir(parents=True, exist_ok=True)
    with open(cwd / "server.log", "wb") as log:
        proc = subprocess.Popen(
            ["bash", str(INFRA / "mlflow-server.sh")],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group this test started, SIGKILL to whatever outlives it."""
    children = _tree(proc.pid)[1:]
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(wait_s)
        _, children = psutil.wait_procs(children, timeout=wait_s)
        if proc.returncode is not None and not children:
            return


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _wait_healthy(proc: subprocess.Popen, host: str, port: int, log: Path) -> None:
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow-server.sh exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (URLError, OSError):
            time.sleep(0.5)
    pytest.fail(f"no /health on {host}:{port}:\n{log.read_text()[-3000:]}")


def _listening(proc: subprocess.Popen, port: int) -> set[str]:
    return {
        c.laddr.ip
        for p in _tree(proc.pid)
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }


class _Server(NamedTuple):
    host: str  # where it must listen
    port: int
    cwd: Path
    settings: dict[str, str]
    database: Path  # the SQLite store it must create
    artifacts: Path  # where logged artifacts must land


def test_mlflow_server_script_serves_loopback_with_settings_from_env(tmp_path):
    """Two servers side by side: one with every setting from the environment (on 127.0.0.2,
    still loopback, to show MLFLOW_HOST is honoured), one with the defaults."""
    here, port = tmp_path / "set", _free_port("127.0.0.2")
    configured = _Server(
        "127.0.0.2",
        port,
        here,
        {
            "MLFLOW_HOST": "127.0.0.2",
            "MLFLOW_PORT": str(port),
            "MLFLOW_SERVER_ALLOWED_HOSTS": f"127.0.0.2:{port}",
            "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{here}/tracking.db",
            "MLFLOW_ARTIFACTS_DESTINATION": str(here / "artifacts"),
        },
        here / "tracking.db",
        here / "artifacts",
    )
    here, port = tmp_path / "default", _free_port("127.0.0.1")
    state = here / "runs" / "mlflow-server"
    default = _Server(
        "127.0.0.1",
        port,
        here,
        {"MLFLOW_PORT": str(port)},
        state / "mlflow.db",
        state / "artifacts",
    )

    started: list[psutil.Process] = []
    with ExitStack() as stack:
        cases = [
            (s, stack.enter_context(_mlflow_server(s.settings, s.cwd)))
            for s in (configured, default)
        ]
        for case, proc in cases:
            _wait_healthy(proc, case.host, case.port, case.cwd / "server.log")
            started += _tree(proc.pid)
            server = psutil.Process(proc.pid)
            command = server.cmdline()
            assert Path(command[1]).name == "mlflow" and command[2] == "server", (
                f"the script execs the server, so its pid is the server's: {command}"
            )
            assert server.environ()["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
            assert _listening(proc, case.port) == {case.host}
            assert case.database.is_file()

            client = MlflowClient(tracking_uri=f"http://{case.host}:{case.port}")
            run = client.create_run(client.create_experiment("infra-test"))
            note = case.cwd / "note.txt"
            note.write_text("hyla")
            client.log_artifact(run.info.run_id, str(note))
            assert [p.read_text() for p in case.artifacts.rglob("note.txt")] == ["hyla"]
    assert not [p for p in started if p.is_running()], "servers left running"
