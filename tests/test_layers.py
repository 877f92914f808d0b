"""The code's shape, checked like its behaviour: one-way layers (import-linter contracts in pyproject.toml),
no import cycle, imports at module top unless deferred on purpose, one distribution namespace, a linter and
a type checker on every package, stubs that regenerate identically."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp

from drafthorse.protos.generate import generate

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FOLDERS = ("actors", "cluster", "runtime", "protos")   # installed as drafthorse.<folder>
ROOTS = [f"drafthorse.{f}" for f in FOLDERS]
TYPED = ROOTS   # mypy's packages: all of them (runtime, data plane, control plane, wire contract)


def sources(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py") if "_pb2" not in p.name)


def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)


def test_import_contracts_are_kept():
    out = run(str(BIN / "lint-imports"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout and "4 kept" in out.stdout


def test_no_import_cycle_between_modules():
    graph = grimp.build_graph(*ROOTS)
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    # Tarjan's strongly connected components: any with two or more modules is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    assert not cycles, cycles


def test_imports_are_at_module_top_unless_deferred_on_purpose():
    loose = []
    for p in sources(*FOLDERS):
        src = p.read_text()
        lines = src.splitlines()
        for fn in ast.walk(ast.parse(src)):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and "# deferred" not in lines[node.lineno - 1]:
                        loose.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert not loose, f"function-local imports without a '# deferred: why' comment: {loose}"


def test_one_namespace_no_bare_top_level_imports():
    bare = re.compile(r"^\s*(from|import) (actors|cluster|runtime|protos)\b", re.M)
    hits = [str(p.relative_to(ROOT)) for p in sources(*FOLDERS, "tests") if bare.search(p.read_text())]
    assert not hits, f"import these as drafthorse.<package>: {hits}"


def test_every_package_folder_is_installed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"] == {f"drafthorse.{f}": f for f in FOLDERS}
    found = {"drafthorse." + ".".join(d.relative_to(ROOT).parts) for f in FOLDERS
             for d in [ROOT / f, *(ROOT / f).rglob("*")] if (d / "__init__.py").is_file()}
    assert set(cfg["packages"]) == found


def test_ruff():
    out = run(str(BIN / "ruff"), "check", "--no-cache", *FOLDERS, "tests")
    assert out.returncode == 0, out.stdout[-4000:]


def test_mypy_on_every_package():
    # the folders install under one namespace (package-dir mapping), which mypy cannot follow in the source
    # tree: give it the same names through links (in build/, ignored by git; a fixed place keeps its cache)
    links = ROOT / "build" / "typecheck"
    for f in FOLDERS:
        link = links / "drafthorse" / f
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(ROOT / f, target_is_directory=True)
    args = [a for pkg in TYPED for a in ("-p", pkg)]
    out = run(sys.executable, "-m", "mypy", *args, env={"MYPYPATH": str(links), "PATH": str(BIN)})
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_stubs_regenerate_identically(tmp_path):
    for new in generate(tmp_path):
        committed = ROOT / new.relative_to(tmp_path)
        assert new.read_text() == committed.read_text(), f"{committed} is stale: python -m drafthorse.protos.generate"


def test_cli_answers_without_loading_torch_or_ray():
    # the CLI defers heavy imports to the command that needs them (cluster/cli.py)
    code = "import sys; from drafthorse.cluster.cli import app; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = run(sys.executable, "-c", code)
    assert out.returncode == 0 and out.stdout.split() == ["False", "False"], out.stdout + out.stderr
