"""The README's names exist: every `ml.X.Y` and `model.X` it mentions, and every import line of its
code blocks (so the documented API and the code cannot drift apart)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import mechlens as ml

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _resolve(root: object, dotted: str) -> object:
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


ML_NAMES = sorted(set(re.findall(r"\bml\.([A-Za-z_][\w.]*[A-Za-z0-9_])", README)))
MODEL_NAMES = sorted(set(re.findall(r"\bmodel\.([A-Za-z_]\w*)", README)))
IMPORTS = sorted(
    {
        line.strip()
        for block in re.findall(r"```python\n(.*?)```", README, re.S)
        for line in block.splitlines()
        if re.match(r"\s*(from mechlens|import mechlens)", line)
    }
)


@pytest.mark.parametrize("name", ML_NAMES)
def test_ml_names_exist(name):
    _resolve(ml, name)


def test_model_names_exist():
    model = ml.load_model("tiny-llama")
    missing = [n for n in MODEL_NAMES if not hasattr(model, n)]
    assert not missing, f"README names model.{missing} that HookedModel lacks"


@pytest.mark.parametrize("line", IMPORTS)
def test_readme_imports_work(line):
    exec(line.split("#")[0], {})


def test_readme_mentions_enough_to_be_checked():
    assert len(ML_NAMES) > 15 and len(MODEL_NAMES) > 20 and len(IMPORTS) > 3


def test_old_module_paths_still_import():
    import mechlens.anchors
    import mechlens.heads
    import mechlens.lens
    from mechlens.refusal import Rollout, resample  # 0.1 names

    assert mechlens.lens.logit_lens is ml.logit_lens and mechlens.heads is ml.ops.heads
    assert (
        mechlens.anchors is ml.studies.anchors
        and Rollout is ml.refusal.Reply
        and resample is ml.refusal.stretch
    )


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
    ):
        assert name in ml.__all__
