"""The walls between rooms (ARCHITECTURE.md, "Rooms"): the trainer reads data_tools only through the
shard contract (`data_tools.manifest`, which reads through `data_tools.storage`) and the shared leaf
(`data_tools.common`), so the pipeline's
heavy dependencies and internals never become the trainer's."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = {"data_tools.manifest", "data_tools.storage", "data_tools.common"}


def imported_modules(path: Path) -> set[str]:
    """Every absolute module an import statement in `path` names (`from data_tools import x` names data_tools.x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            if node.module == "data_tools":
                names |= {f"data_tools.{alias.name}" for alias in node.names}
    return names


def test_the_trainer_imports_only_the_manifest_its_storage_and_the_shared_leaf_from_data_tools():
    found = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted((ROOT / "trainer").rglob("*.py"))
        for name in imported_modules(path)
        if (name == "data_tools" or name.startswith("data_tools.")) and name not in ALLOWED
    }
    assert not found, f"trainer imports data_tools beyond {sorted(ALLOWED)}: {sorted(found)}"


def test_the_shared_leaf_imports_nothing_of_the_project():
    """`data_tools.common` is a leaf: importing it must not pull in either package."""
    imports = imported_modules(ROOT / "data_tools" / "common.py")
    assert not {name for name in imports if name.split(".")[0] in ("data_tools", "trainer")}


def test_the_walk_sees_a_forbidden_import(tmp_path):
    """The check can fail: a module importing the pipeline is reported."""
    module = tmp_path / "m.py"
    module.write_text("from data_tools import pipeline\nimport data_tools.dedup\nfrom data_tools.manifest import load_manifest\n")
    assert imported_modules(module) - ALLOWED == {"data_tools", "data_tools.pipeline", "data_tools.dedup"}
