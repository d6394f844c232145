"""Backends and their registry: `load_model(..., backend=NAME)` builds the backend registered as NAME.

A new backend is a class with a `name` and a `run(request)` method (the `Backend` protocol of
`mechlens.models.protocol`) and a factory `(hf_model, tokenizer, arch, model_name) -> Backend`:

    >>> from mechlens.models.backends import BACKENDS, register_backend
    >>> sorted(BACKENDS)
    ['nnsight', 'transformer_lens']
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mechlens.models.architecture import Architecture
from mechlens.models.protocol import Backend, BackendFactory


def _transformer_lens(hf_model: nn.Module, tokenizer: Any, arch: Architecture, name: str) -> Backend:
    from mechlens.models.backends.transformer_lens import TransformerLensBackend

    return TransformerLensBackend(hf_model, tokenizer, arch, name)


def _nnsight(hf_model: nn.Module, tokenizer: Any, arch: Architecture, name: str) -> Backend:
    from mechlens.models.backends.nnsight import NNsightBackend

    return NNsightBackend(hf_model, tokenizer, arch, name)


BACKENDS: dict[str, BackendFactory] = {"transformer_lens": _transformer_lens, "nnsight": _nnsight}


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make `load_model(..., backend=name)` build its backend with `factory`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a backend name must be a non-empty string, got {name!r}")
    BACKENDS[name] = factory


def make_backend(
    name: str, hf_model: nn.Module, tokenizer: Any, arch: Architecture, model_name: str
) -> Backend:
    """The registered backend `name` wrapped around `hf_model`."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose from {sorted(BACKENDS)}")
    return BACKENDS[name](hf_model, tokenizer, arch, model_name)
