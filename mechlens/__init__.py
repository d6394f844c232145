"""mechlens: mechanistic interpretability for reasoning language models.

>>> import mechlens as ml
>>> model = ml.load_model("tiny-llama")       # ml.load_model() for the embedded SmolLM2
>>> logits, cache = model.run_with_cache(model.to_tokens("2 + 2 = 4"), names=["resid_post"])
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mechlens import anchors, datasets, depth, heads, metrics, probes, signals  # noqa: E402  (ml.depth, ...)
from mechlens.lens import LensResult, logit_lens  # noqa: E402
from mechlens.models import (  # noqa: E402
    ActivationCache,
    Generation,
    HookedModel,
    cache_dir,
    load_model,
    tiny_model,
)
from mechlens.trace import ReasoningTrace, Sentence, split_sentences  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "ActivationCache",
    "Generation",
    "HookedModel",
    "cache_dir",
    "load_model",
    "tiny_model",
    "ReasoningTrace",
    "Sentence",
    "split_sentences",
    "LensResult",
    "logit_lens",
    "anchors",
    "datasets",
    "depth",
    "heads",
    "metrics",
    "probes",
    "signals",
]
