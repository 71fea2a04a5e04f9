"""Every import runs down the layers: kernel <- aggregator <- the services <- simulators and web <- the smame app.

A package may import its own modules and those of any lower layer, never a peer's or a higher layer's."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [
    {"kernel"},  # settings, registry, slot grid, meter constants, the typed reading
    {"aggregator"},  # slots, the store, ingest and its writer process
    {"broker_bridge", "csv_export", "ftp_gateway", "monitoring"},  # the services, each on the store
    {"simulators", "web"},  # units on the wire; the web server over what the services keep
    {"smame"},  # the app, its supervisor and the command line
]
RANK = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}


def imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, those inside functions included; relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = path.relative_to(root).parent.parts
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                out.append((node.lineno, ".".join([*base, *(node.module or "").split(".")]).strip(".")))
            elif node.module:
                out.append((node.lineno, node.module))
    return out


def upward(path: Path, root: Path = ROOT) -> list[str]:
    """The imports of a file of the project under `root` that break the layering, as `file:line imports module`."""
    own = path.relative_to(root).parts[0]
    bad = []
    for line, module in imports(path, root):
        target = module.split(".")[0]
        if target in RANK and target != own and RANK[target] >= RANK[own]:
            bad.append(f"{path.relative_to(root)}:{line} imports {module}")
    return bad


def test_every_package_of_the_project_has_a_layer() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "bench"}
    assert packages == set(RANK)


def test_no_import_runs_up_the_layers() -> None:
    files = [f for package in RANK for f in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 40
    assert [bad for f in files for bad in upward(f)] == []


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("from smame.app import App\n", True),  # a service importing the app
        ("def f():\n    from csv_export import exporter\n", True),  # a peer, inside a function
        ("import simulators.fleet\n", True),
        ("from kernel.timegrid import Grid\nfrom aggregator.store import Store\n", False),
        ("from . import outbox\n", False),  # its own package
    ],
)
def test_the_check_sees_an_upward_import(tmp_path: Path, source: str, found: bool) -> None:
    probe = tmp_path / "monitoring" / "probe.py"
    probe.parent.mkdir()
    probe.write_text(source, encoding="utf-8")
    assert bool(upward(probe, tmp_path)) is found
