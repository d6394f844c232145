"""The package's layers import downwards only: `cache` <- `models` <- `text` <- `rollouts` <- `ops`
<- `studies` <- `organism`. Read from the source with `ast`, so an import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mechlens"
# each layer may import the layers listed before it (and itself), never one after it
LAYERS = ["cache", "models", "text", "rollouts", "ops", "studies", "organism"]


def imported_modules(path: Path) -> set[str]:
    """Every `mechlens.X` module a file imports, at any depth of its code (not under
    `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):  # imports only for the type checker create no dependency
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mechlens")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "mechlens":
                found |= {f"mechlens.{a.name}" for a in node.names}
            elif node.module.startswith("mechlens."):
                found.add(node.module)
    return found


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


@pytest.mark.parametrize("layer", LAYERS)
def test_layers_import_downwards(layer):
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    root = PACKAGE / layer
    files = sorted(root.rglob("*.py")) if root.is_dir() else [PACKAGE / f"{layer}.py"]
    wrong = {
        f"{path.relative_to(PACKAGE)} imports {module}"
        for path in files
        for module in imported_modules(path)
        if layer_of(module) not in allowed | {None}
    }
    assert not wrong, sorted(wrong)


def test_studies_never_import_the_organism():
    wrong = [
        str(p.relative_to(PACKAGE))
        for p in (PACKAGE / "studies").rglob("*.py")
        if any(layer_of(m) == "organism" for m in imported_modules(p))
    ]
    assert not wrong


def test_the_walk_sees_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(
        "def f():\n    from mechlens.organism import x\n"
        "import mechlens.ops.lens\nfrom mechlens import studies\n"
        "if TYPE_CHECKING:\n    from mechlens.organism import y\n"
    )
    assert imported_modules(f) == {"mechlens.organism", "mechlens.ops.lens", "mechlens.studies"}
