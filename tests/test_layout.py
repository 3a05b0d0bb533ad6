"""The package layout follows the data path: a stage imports only from stages before it (no circle)."""
from __future__ import annotations

import ast
from pathlib import Path

import w2t

PACKAGE = Path(w2t.__file__).parent
# the data path (docs/design.md §6); zoo builds collections the data stage may ask for
ORDER = ["errors", "progress", "io", "canon", "zoo", "data", "models", "tasks", "train", "search"]


def _stage(module: str) -> str:
    return module.split(".")[1]


def _imports(path: Path) -> set[str]:
    """w2t modules imported at module level (not under TYPE_CHECKING, not inside functions)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("w2t."):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("w2t.")}
    return out


def test_every_stage_imports_only_earlier_stages():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        if rel.parts[1] == "__init__":
            continue
        stage = rel.parts[1]
        for module in _imports(path):
            if ORDER.index(_stage(module)) > ORDER.index(stage):
                wrong.append(f"{'/'.join(rel.parts)} imports {module}")
    assert not wrong, wrong
    assert sorted(p.name.removesuffix(".py") for p in PACKAGE.iterdir() if not p.name.startswith("_")
                  and p.name != "__pycache__") == sorted(ORDER), "a stage is missing from ORDER"


def test_public_api():
    for name in ("load_adapter", "canonicalize", "canonicalize_adapter", "load_pretrained", "Collection", "TokenCache"):
        assert name in w2t.__all__ and callable(getattr(w2t, name)), name


def test_results_page_is_generated_from_the_committed_comparisons():
    import runpy

    root = PACKAGE.parent
    render = runpy.run_path(str(root / "scripts" / "results_doc.py"))["render"]
    assert (root / "docs" / "results.md").read_text() == render(root / "results" / "compare"), \
        "docs/results.md is stale: run python scripts/results_doc.py"
    readme = (root / "README.md").read_text()
    with_summary = runpy.run_path(str(root / "scripts" / "results_doc.py"))["with_summary"]
    assert "<!-- results:begin" in readme and readme == with_summary(readme, root / "results" / "compare"), \
        "README's results block is stale: run python scripts/results_doc.py"
