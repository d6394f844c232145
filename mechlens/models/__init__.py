"""Models: `load_model`, the HookedModel protocol and its two backends."""

from mechlens.models.hooked import CACHE_NAMES, ActivationCache, Generation, HookedModel, Prefix
from mechlens.models.loading import BACKENDS, EMBEDDED, cache_dir, load_model
from mechlens.models.tiny import TINY_ARCHS, tiny_model

__all__ = [
    "BACKENDS",
    "CACHE_NAMES",
    "EMBEDDED",
    "TINY_ARCHS",
    "ActivationCache",
    "Generation",
    "HookedModel",
    "Prefix",
    "cache_dir",
    "load_model",
    "tiny_model",
]
