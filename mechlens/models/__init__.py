"""Models: `load_model`, `HookedModel`, the backend protocol and registry, sampling settings."""

from mechlens.models.backends import BACKENDS, register_backend
from mechlens.models.generation import Generation
from mechlens.models.hooked import ActivationCache, HookedModel, Prefix
from mechlens.models.loading import EMBEDDED, load_model
from mechlens.models.protocol import CACHE_NAMES, Backend, RunOutput, RunRequest
from mechlens.models.sampling import Sampling
from mechlens.models.tiny import TINY_ARCHS, tiny_model

__all__ = [
    "BACKENDS",
    "CACHE_NAMES",
    "EMBEDDED",
    "TINY_ARCHS",
    "ActivationCache",
    "Backend",
    "Generation",
    "HookedModel",
    "Prefix",
    "RunOutput",
    "RunRequest",
    "Sampling",
    "load_model",
    "register_backend",
    "tiny_model",
]
