"""The dependency direction (docs/design.md): entry scripts -> yolo -> utils, never backwards."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY_SCRIPTS = sorted(path.stem for path in REPO.glob("*.py") if path.stem != "hubconf")


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


def project_imports(path: Path) -> set[str]:
    """The ``yolo.*`` and ``utils.*`` modules ``path`` imports, at any depth of its code (an
    import inside a function or under ``TYPE_CHECKING`` counts: it is a dependency all the same)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.split(".")[0] in ("yolo", "utils")}


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, for every module of yolo/ and utils/."""
    modules = {
        f"{package}.{path.stem}": path
        for package in ("yolo", "utils")
        for path in (REPO / package).glob("*.py")
        if path.stem != "__init__"
    }
    return {name: project_imports(path) & modules.keys() for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None (depth-first)."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for target in sorted(graph[node]):
            cycle = visit(target, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    return next((cycle for node in sorted(graph) if (cycle := visit(node, []))), None)


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_yolo_and_utils_import_each_other_in_no_cycle():
    graph = import_graph()
    assert {"yolo.detect", "yolo.video", "yolo.train", "utils.data"} <= graph.keys()
    assert "yolo.source" in graph["yolo.video"]  # the graph sees real edges
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_torch_free_names_agree_with_what_builds_them():
    from utils.anchors import default_anchors
    from yolo.loss import YOLOv2Loss
    from yolo.model import build_model
    from yolo.names import ASSIGNMENTS, DARKNET_NAMES, MODEL_NAMES, RESNET_NAMES
    from yolo.resnet import RESNETS

    assert tuple(RESNETS) == RESNET_NAMES and (*DARKNET_NAMES, *RESNET_NAMES) == MODEL_NAMES
    for name in DARKNET_NAMES:  # each builds (resnets would download weights; RESNETS above)
        assert build_model(name, num_classes=2, num_anchors=1).backbone_name == name
    for mode in ASSIGNMENTS:
        assert YOLOv2Loss(default_anchors(), 2, assignment=mode).assignment == mode
    with pytest.raises(ValueError, match="not one of"):
        YOLOv2Loss(default_anchors(), 2, assignment="other")
