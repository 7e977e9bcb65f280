"""hyla/parallel reaches the kernels through their public API only: every import from
hyla.kernels names the package itself and only names it exports (`hyla.kernels.__all__`),
read from the source with ast, so a private module or helper cannot slip back in."""

from __future__ import annotations

import ast
from pathlib import Path

import hyla.kernels
import hyla.parallel

PARALLEL = Path(hyla.parallel.__file__).parent


def _kernel_imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name) of each import of hyla.kernels or below in `path`; name is None
    for a plain `import`."""
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hyla.kernels"):
            found += [(node.lineno, node.module or "", alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [
                (node.lineno, alias.name, None)
                for alias in node.names
                if alias.name.startswith("hyla.kernels")
            ]
    return found


def test_parallel_imports_only_the_kernels_public_api():
    exported = set(hyla.kernels.__all__)
    files = sorted(PARALLEL.glob("*.py"))
    assert files, f"no modules found in {PARALLEL}"
    offences, seen = [], 0
    for path in files:
        for line, module, name in _kernel_imports(path):
            seen += 1
            where = f"{path.name}:{line}"
            if module != "hyla.kernels":
                offences.append(f"{where} imports {module}, not the package hyla.kernels")
            elif name is not None and name not in exported:
                offences.append(f"{where} imports {name}, which hyla.kernels does not export")
    assert seen, "hyla/parallel imports nothing from hyla.kernels: is the walk reading it?"
    assert not offences, "\n".join(offences)
