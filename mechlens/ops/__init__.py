"""Operations on a HookedModel that the studies compose: the streaming logit lens, divergence
kernels, span attention, head-ablation sweeps, activation collection and probes, per-token
signals, fine-tuning, and statistics."""

from mechlens.ops import attention, distributions, finetune, heads, lens, probes, signals, stats

__all__ = ["attention", "distributions", "finetune", "heads", "lens", "probes", "signals", "stats"]
