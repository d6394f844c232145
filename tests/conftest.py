"""Shared fixtures: tiny random models (fast, offline) and the embedded model (slow)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import mechlens as ml
from mechlens.cache import cache_dir
from mechlens.models.tiny import tiny_model

BACKENDS = ["transformer_lens", "nnsight"]
ARCHS = ["llama", "qwen2", "gpt2"]


def wrap_with_reference(arch: str, backend: str, **kwargs):
    """A HookedModel on a tiny model and an untouched copy of the same HF model as reference.

    The copy is taken before wrapping: booting a TransformerBridge replaces modules in place.
    """
    hf, tok = tiny_model(arch, **kwargs)
    reference = copy.deepcopy(hf).eval()
    return ml.load_model(hf, backend=backend, tokenizer=tok), reference


@pytest.fixture(autouse=True, scope="session")
def isolated_cache(tmp_path_factory):
    """Tests write results into a fresh cache folder, never the user's; the converted embedded
    weights (minutes to rebuild) are shared with the user's cache through a link."""
    real, tmp = cache_dir(), tmp_path_factory.mktemp("mechlens-cache")
    (real / "models").mkdir(parents=True, exist_ok=True)
    (tmp / "models").symlink_to(real / "models", target_is_directory=True)
    old = os.environ.get("MECHLENS_CACHE")
    os.environ["MECHLENS_CACHE"] = str(tmp)
    yield tmp
    if old is None:
        os.environ.pop("MECHLENS_CACHE", None)
    else:
        os.environ["MECHLENS_CACHE"] = old


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def llama(backend):
    return wrap_with_reference("llama", backend)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(5, 200, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def embedded_tl():
    return ml.load_model()


@pytest.fixture(scope="session")
def embedded_nnsight():
    return ml.load_model(backend="nnsight")


@pytest.fixture(scope="session")
def embedded_hf():
    from transformers import AutoModelForCausalLM

    from mechlens.models.loading import embedded_weights_dir

    return AutoModelForCausalLM.from_pretrained(
        str(embedded_weights_dir()), attn_implementation="eager", dtype=torch.float32
    ).eval()
