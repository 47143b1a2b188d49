"""The storage layer imports nothing above it (config, API, backup, restore, archive, CLI).

Layers talk through narrow public methods; an import running back up the layers is how a
storage change starts to depend on flags or HTTP. Read from the source with ``ast`` so a
lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import unisondb.storage

ABOVE = ("config", "api", "backup", "restore", "archive", "cli", "server", "metrics", "lifecycle")


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_storage_never_imports_the_layers_above_it() -> None:
    root = Path(unisondb.storage.__file__).parent
    bad = [
        f"{p.name}: {name}"
        for p in sorted(root.glob("*.py"))
        for name in _imports(p)
        if any(name == f"unisondb.{a}" or name.startswith(f"unisondb.{a}.") for a in ABOVE)
    ]
    assert bad == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from unisondb.config import EngineConfig\n")
    assert "unisondb.config" in _imports(p)


def test_config_re_exports_the_engine_options() -> None:
    from unisondb.config import EngineConfig
    from unisondb.storage.options import EngineConfig as Options

    assert EngineConfig is Options
