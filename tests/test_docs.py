"""The README and docs/ cite only what a clone has: every relative link resolves to a file of
the repository (and its ``#anchor`` to a heading there), and every repository path written in
backticks (``bench/results/x.md``, ``docs/x.md``) names a file or folder that is committed."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target "title")
FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.S | re.M)
CODE_PATH = re.compile(r"`((?:assets|bench|docs|tests|utils|yolo)/[\w./{},-]*\w)`")


def tracked() -> set[str]:
    """The repository's files (what a clone has), or those on disk outside git."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return {str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file()}
    return set(out.splitlines())


FILES = tracked()
WRITTEN_ON_A_GPU = {"bench/results/gpu.md"}  # `make gpu-check` writes it (docs/performance.md)
CITABLE = FILES | WRITTEN_ON_A_GPU
FOLDERS = {str(parent) for f in FILES for parent in Path(f).parents if str(parent) != "."}


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    text = FENCE.sub("", doc.read_text(encoding="utf-8"))
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def expand(path: str) -> list[str]:
    """``small_data.{md,json}`` -> both names."""
    m = re.search(r"\{([^}]*)\}", path)
    if not m:
        return [path]
    choices = (path.replace(m.group(0), choice, 1) for choice in m.group(1).split(","))
    return [name for choice in choices for name in expand(choice)]


def test_slug_follows_github_and_braces_expand():
    assert expand("bench/results/x.{md,json}") == ["bench/results/x.md", "bench/results/x.json"]
    assert slug("Do k-means anchors help a small set?") == "do-k-means-anchors-help-a-small-set"
    assert slug("COCO (an instances JSON)") == "coco-an-instances-json"
    assert slug("`--preset small`: what it sets") == "--preset-small-what-it-sets"
    assert slug("Loss (`bench/loss_speed.py`)") == "loss-benchloss_speedpy"


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_links_resolve_to_committed_files_and_headings(doc):
    text = FENCE.sub("", doc.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)  # a link written as code is not a link
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http(s):, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        rel = file.relative_to(REPO).as_posix() if file.is_relative_to(REPO) else str(file)
        if rel not in FILES and rel not in FOLDERS:
            broken.append(f"{target}: no such file in the repository")
        elif anchor and rel.endswith(".md") and anchor not in anchors(REPO / rel):
            broken.append(f"{target}: no heading #{anchor} in {rel}")
    assert not broken, f"{doc.name}: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_repository_paths_in_backticks_are_committed(doc):
    missing = [path for cited in CODE_PATH.findall(doc.read_text(encoding="utf-8"))
               for path in expand(cited) if path not in CITABLE
               and path.rstrip("/") not in FOLDERS and "*" not in path]  # fmt: skip
    assert not missing, f"{doc.name} cites files a clone does not have: {missing}"
