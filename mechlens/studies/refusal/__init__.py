"""Refusal cliffs in reasoning traces ("Refusal Falls off a Cliff", Yin et al. 2025).

- `judge`: does an answer refuse (`is_refusal`);
- `replies`: replies split into thinking and answer (`Reply`, `sample_replies`, `refusal_rates`);
- `scores`: the refusal probe's score at every position and per thinking sentence
  (`refusal_features`, `refusal_scores`, `sentence_scores`);
- `cliffs`: cliff metrics and end-aligned, stretched curves;
- `heads`: refusal-suppression heads, random controls, perplexity under ablation;
- `cliff_as_judge`: data selection by the cliff;
- `study`: the whole study of one model (`prompt_sets`, `analyze` -> `RefusalStudy`).

The organisms these run on are in `mechlens.organism`.

Example:
    >>> from mechlens.studies import refusal
    >>> refusal.is_refusal("I cannot help with this request.")
    True
"""

from mechlens.studies.refusal.cliffs import (
    Cliff,
    align_end,
    cliff_metrics,
    end_aligned_mean_ci,
    normalized_curve,
    stretch,
)
from mechlens.studies.refusal.judge import is_refusal
from mechlens.studies.refusal.replies import (
    REPLY_SAMPLING,
    Reply,
    refusal_rates,
    sample_replies,
    sample_replies_by_set,
)
from mechlens.studies.refusal.scores import refusal_features, refusal_scores, sentence_scores, thinking_span
from mechlens.studies.refusal.study import (
    GROUPS,
    PROMPT_SETS,
    HeadStudy,
    JudgeSettings,
    RefusalStudy,
    analyze,
    prompt_sets,
)
from mechlens.text.thinking import split_thinking

__all__ = [
    "GROUPS",
    "PROMPT_SETS",
    "REPLY_SAMPLING",
    "Cliff",
    "HeadStudy",
    "JudgeSettings",
    "RefusalStudy",
    "Reply",
    "align_end",
    "analyze",
    "cliff_metrics",
    "end_aligned_mean_ci",
    "is_refusal",
    "normalized_curve",
    "prompt_sets",
    "refusal_features",
    "refusal_rates",
    "refusal_scores",
    "sample_replies",
    "sample_replies_by_set",
    "split_thinking",
    "stretch",
    "sentence_scores",
    "thinking_span",
]
