"""mechlens: mechanistic interpretability for reasoning language models.

Layers, from the bottom: `models` (HookedModel, backends, sampling), `cache`, `text` (traces,
thinking, answers), `ops` (lens, attention, heads, probes, signals, fine-tuning, statistics),
`studies` (depth, refusal, anchors, echoes, stepwise, budget, evolution, steering, patching),
`datasets`, `plots`, and `runs` for experiment scripts.

>>> import mechlens as ml
>>> model = ml.load_model("tiny-llama")       # ml.load_model() for the embedded SmolLM2
>>> logits, cache = model.run_with_cache(model.to_tokens("2 + 2 = 4"), names=["resid_post"])
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mechlens import (  # noqa: E402
    datasets,
    ops,
    organism,  # noqa: E402
    studies,
    text,
)
from mechlens.cache import DiskCache, cache_dir  # noqa: E402
from mechlens.models import (  # noqa: E402
    ActivationCache,
    Backend,
    Generation,
    HookedModel,
    Sampling,
    load_model,
    register_backend,
    tiny_model,
)
from mechlens.ops import attention, finetune, heads, probes, signals, stats  # noqa: E402
from mechlens.ops.heads import head_ablation_effects  # noqa: E402
from mechlens.ops.lens import LensResult, logit_lens  # noqa: E402
from mechlens.ops.probes import LinearProbe, collect_activations  # noqa: E402
from mechlens.runs import Run  # noqa: E402
from mechlens.studies import (  # noqa: E402
    anchors,
    budget,
    depth,
    echoes,
    evolution,
    patching,
    refusal,
    steering,
    stepwise,
)
from mechlens.text import ReasoningTrace, Sentence, format_prompt, split_sentences  # noqa: E402

__version__ = "0.3.0"

__all__ = [
    "ActivationCache",
    "Backend",
    "DiskCache",
    "Generation",
    "HookedModel",
    "LensResult",
    "LinearProbe",
    "ReasoningTrace",
    "Run",
    "Sampling",
    "Sentence",
    "anchors",
    "attention",
    "budget",
    "cache_dir",
    "collect_activations",
    "datasets",
    "depth",
    "echoes",
    "evolution",
    "finetune",
    "format_prompt",
    "head_ablation_effects",
    "heads",
    "load_model",
    "logit_lens",
    "ops",
    "organism",
    "patching",
    "probes",
    "refusal",
    "register_backend",
    "signals",
    "split_sentences",
    "steering",
    "stats",
    "stepwise",
    "studies",
    "text",
    "tiny_model",
]
