"""The dependency direction (docs/design.md): entry scripts -> yolo -> utils, never backwards."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY_SCRIPTS = sorted(path.stem for path in REPO.glob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """The top-level names of every module ``path`` imports (absolute imports)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_entry_scripts_are_the_ones_the_readme_lists():
    assert {"train_yolov2", "test_yolov2", "kmeans", "detect", "export"} <= set(ENTRY_SCRIPTS)


@pytest.mark.parametrize("package", ["utils", "yolo", "bench"])
def test_no_library_module_imports_an_entry_script(package):
    for path in sorted((REPO / package).glob("*.py")):
        assert not imported_modules(path) & set(ENTRY_SCRIPTS), path


def test_utils_never_imports_yolo():
    for path in sorted((REPO / "utils").glob("*.py")):
        assert "yolo" not in imported_modules(path), path
