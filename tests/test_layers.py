"""The layers stay visible: every import in the project (module level or inside a function)
runs only in the allowed directions.

    astraea/ (foundation)      imports no service
    control_plane/core/        pure scheduling: imports astraea only
    control_plane/service/     control_plane/core + astraea
    worker/, predictor_svc/,   astraea only (services talk over proto, never by import)
    gateway/
    astraea/tools/             may import everything; only tests import it
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("astraea", "control_plane", "worker", "predictor_svc", "gateway")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement in the file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" \
        else _module_name(path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # `from astraea import tools` names a module too
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _violation(importer: str, imported: str) -> str | None:
    if not any(_under(imported, p) for p in PACKAGES):
        return None  # the standard library or a third-party package
    if _under(imported, "astraea.tools") and not _under(importer, "astraea.tools"):
        return "only astraea.tools and the tests may import astraea.tools"
    if _under(importer, "astraea.tools"):
        return None
    if _under(importer, "astraea"):
        if not _under(imported, "astraea"):
            return "the foundation (astraea/) imports no service"
    elif _under(importer, "control_plane.core"):
        if not (_under(imported, "astraea") or _under(imported, "control_plane.core")):
            return "the scheduling core imports only astraea and itself"
    elif _under(importer, "control_plane"):
        if not (_under(imported, "astraea") or _under(imported, "control_plane")):
            return "the control plane imports only astraea and itself"
    else:
        own = importer.split(".")[0]
        if not (_under(imported, "astraea") or _under(imported, own)):
            return f"{own} imports only astraea and itself"
    return None


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
                  if "v1" not in p.relative_to(ROOT).parts[:2])


def test_every_import_runs_in_an_allowed_direction():
    bad = []
    for path in _sources():
        importer = _module_name(path)
        for line, imported in _imports(path):
            why = _violation(importer, imported)
            if why:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {imported}: {why}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("importer,imported,allowed", [
    ("astraea.wire", "control_plane.core.job", False),
    ("astraea.telemetry.spans", "worker.backend", False),
    ("astraea.client.client", "astraea.tools.stack", False),
    ("astraea.tools.cli.main", "worker.vllm.engine", True),
    ("control_plane.core.scheduler", "control_plane.service.registry", False),
    ("control_plane.core.scheduler", "astraea.plan", True),
    ("control_plane.service.registry", "worker.backend", False),
    ("control_plane.service.planner", "control_plane.core.plan", True),
    ("worker.process", "control_plane.core.job", False),
    ("worker.sim.engine", "astraea.plan", True),
    ("predictor_svc.server", "control_plane.core.estimates", False),
    ("predictor_svc.server", "astraea.estimators", True),
    ("worker.vllm.engine", "vllm.v1.engine", True),
    ("gateway.app", "astraea.client", True),
    ("gateway.app", "control_plane.service.agent_service", False),
    ("gateway.chat", "worker.vllm.tiny_model", False),
    ("astraea.tools.stack", "gateway.server", True),
    ("astraea.store.sql", "control_plane.service.context", False),
    ("control_plane.service.server", "astraea.store", True),
    ("gateway.app", "astraea.store.records", True),
])
def test_the_rules_themselves(importer, imported, allowed):
    # The checker must reject what the layering forbids, or the test above proves nothing.
    assert (_violation(importer, imported) is None) is allowed


def test_function_local_and_relative_imports_are_seen(tmp_path, monkeypatch):
    pkg = tmp_path / "worker"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    src = pkg / "mod.py"
    src.write_text("def f():\n    from control_plane.core import job\n"
                   "from .sim import engine\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = {m for _, m in _imports(src)}
    assert "control_plane.core" in found and "worker.sim" in found
