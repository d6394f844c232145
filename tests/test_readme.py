"""The README's and the docs' names exist: every `ml.X.Y` and `model.X` they mention, and every
import line of their code blocks (so the documented API and the code cannot drift apart); every
relative link points to a file of the repository; the README stays a short front door and
docs/index.md lists every page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import mechlens as ml

ROOT = Path(__file__).resolve().parent.parent
README_PATH = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README_PATH, *sorted(DOCS.glob("*.md"))]
TEXTS = {p.relative_to(ROOT).as_posix(): p.read_text() for p in PAGES}
README = TEXTS["README.md"]


def _resolve(root: object, dotted: str) -> object:
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _ml_names(text: str) -> list[str]:
    return sorted(set(re.findall(r"\bml\.([A-Za-z_][\w.]*[A-Za-z0-9_])", text)))


def _model_names(text: str) -> list[str]:
    return sorted(set(re.findall(r"\bmodel\.([A-Za-z_]\w*)", text)))


def _imports(text: str) -> list[str]:
    return sorted(
        {
            line.strip()
            for block in re.findall(r"```python\n(.*?)```", text, re.S)
            for line in block.splitlines()
            if re.match(r"\s*(from mechlens|import mechlens)", line)
        }
    )


def _links(text: str) -> list[str]:
    """Relative link targets of a Markdown page, outside code: no http(s)/mailto, no #anchors."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    targets = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)
    targets += re.findall(r"^\s*\[[^\]]+\]:\s*(\S+)", prose, flags=re.M)  # reference definitions
    out = []
    for t in targets:
        if re.match(r"[a-z][a-z0-9+.-]*:", t, re.I) or t.startswith("#"):
            continue
        out.append(t.split("#")[0].split("?")[0])
    return sorted(set(out))


ML_CASES = [(page, name) for page, text in TEXTS.items() for name in _ml_names(text)]
IMPORT_CASES = [(page, line) for page, text in TEXTS.items() for line in _imports(text)]
LINK_CASES = [(page, link) for page, text in TEXTS.items() for link in _links(text)]


@pytest.mark.parametrize(("page", "name"), ML_CASES)
def test_ml_names_exist(page, name):
    _resolve(ml, name)


@pytest.fixture(scope="module")
def tiny_model():
    return ml.load_model("tiny-llama")


@pytest.mark.parametrize("page", list(TEXTS))
def test_model_names_exist(page, tiny_model):
    missing = [n for n in _model_names(TEXTS[page]) if not hasattr(tiny_model, n)]
    assert not missing, f"{page} names model.{missing} that HookedModel lacks"


@pytest.mark.parametrize(("page", "line"), IMPORT_CASES)
def test_imports_work(page, line):
    exec(line.split("#")[0], {})


@pytest.mark.parametrize(("page", "link"), LINK_CASES)
def test_relative_links_exist(page, link):
    target = ((ROOT / page).parent / link).resolve()
    assert target.is_relative_to(ROOT), f"{page} links {link}, outside the repository"
    assert target.exists(), f"{page} links {link}, which does not exist"


def test_readme_mentions_enough_to_be_checked():
    assert len(_ml_names(README)) > 15 and len(_model_names(README)) > 20 and len(_imports(README)) > 0
    assert len(ML_CASES) > 30 and len(IMPORT_CASES) > 10 and len(LINK_CASES) > 10


def test_readme_is_a_front_door():
    n = len(README.splitlines())
    assert n <= 300, f"README.md has {n} lines; move detail into docs/"


def test_docs_index_links_every_page():
    index = DOCS / "index.md"
    assert index.exists()
    linked = {((DOCS / link).resolve()) for link in _links(index.read_text())}
    pages = [p for p in sorted(DOCS.glob("*.md")) if p.name != "index.md"]
    missing = [p.name for p in pages if p.resolve() not in linked]
    assert not missing, f"docs/index.md does not link {missing}"


def test_readme_links_the_docs():
    links = set(_links(README))
    assert "docs/index.md" in links and "docs/scaling.md" in links


def test_package_surface():
    for name in ml.__all__:
        assert hasattr(ml, name), name
    for name in (
        "Run",
        "LinearProbe",
        "head_ablation_effects",
        "Sampling",
        "refusal",
        "organism",
        "DiskCache",
        "anchors",
        "depth",
        "attention",
        "finetune",
        "heads",
        "probes",
        "signals",
        "stats",
    ):
        assert name in ml.__all__ and hasattr(ml, name), name
