"""The package has no import cycle: data flows one way (SPEC §2), and a cycle is where that
breaks first. Module-level imports only (function-level ones are deliberate lazy imports);
importing ``exporter.a.b`` also runs ``exporter/a/__init__.py`` unless the importer is inside
``exporter.a`` already."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "exporter"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.parse(path.read_text()).body:
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name if is_package else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                targets = [base]
                targets += [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks count too
                for sub in ast.walk(node):
                    if isinstance(sub, ast.ImportFrom) and sub.module:
                        targets.append(sub.module)
            for target in targets:
                if target not in modules or target == name or name.startswith(target + "."):
                    continue  # a package's own __init__ is already running for its modules
                graph[name].add(target)
                parent = target.rpartition(".")[0]
                while parent and not (name == parent or name.startswith(parent + ".")):
                    if parent in modules:
                        graph[name].add(parent)
                    parent = parent.rpartition(".")[0]
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_the_graph_sees_the_imports() -> None:
    graph = _graph()
    assert "exporter.recorder" in graph["exporter.scheduler"]
    assert "exporter.config" in graph["exporter.probes.common"]
    assert len(graph) > 70


def test_no_import_cycle_in_the_package() -> None:
    assert _cycles(_graph()) == []


def test_run_loads_no_code_its_configuration_may_not_need() -> None:
    # What `run` imports at start-up is resident for the process's life (docs/benchmarks.md,
    # "Where the floor goes"): the web config machinery, the proxies, the httptools parser,
    # pydantic-settings (for PCE_* variables), the other subcommands and httpx's command line
    # load only where they are used.
    code = (
        "import sys, exporter.cli, exporter.daemon\n"
        "print(' '.join(name for name, module in sys.modules.items() if module is not None))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    assert "exporter.server" in loaded
    lazy = {
        "yaml",
        "bcrypt",
        "exporter.webconfig",
        "exporter.proxy",
        "aiohttp",
        "httptools",
        "exporter.reports",
        "exporter.probe_cli",
        "exporter.loadtest",
        "exporter.simulator",
        "httpx._main",
        "pydantic_settings",
        "dotenv",
        "difflib",
    }
    assert sorted(lazy & loaded) == []
