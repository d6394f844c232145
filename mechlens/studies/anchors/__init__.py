"""Thought anchors: which sentences of a chain of thought matter ("Thought Anchors: Which LLM
Reasoning Steps Matter?", Bogdan, Macar, Nanda, Conmy 2025).

Three attributions of a `ReasoningTrace`'s sentences, and their comparison:

- `resample` (black box): regenerate from before each sentence; resampling, counterfactual and
  `forced_answers` importance; `resampling_matrix` for sentence pairs.
- `sentence_attention` / `vertical_scores` / `kurtosis` / `receiver_heads` / `receiver_scores`
  (attention aggregation): heads that focus on a few broadcasting sentences.
- `suppression_matrix` (attention suppression): mask a sentence, measure the log-KL on later ones.
- `label_sentences` (eight-category taxonomy), `spearman`, `lower_triangle`, `category_means`.
- `analyze` (all of the above for one trace), `assign_receivers`, `method_correlations`: the
  study as the CLI and `experiments/thought_anchors.py` run it.

Example:
    >>> import mechlens as ml
    >>> model = ml.load_model("tiny-llama")
    >>> trace = ml.ReasoningTrace.from_text(model, "What is 2+3?", "Let me add. 2 + 3 = 5. So it is 5. Done.")
    >>> ml.anchors.label_sentences([s.text for s in trace.sentences])
    ['plan_generation', 'active_computation', 'result_consolidation']
    >>> ml.anchors.suppression_matrix(model, trace).shape
    torch.Size([3, 3])
"""

from mechlens.studies.anchors.analysis import (
    METHODS,
    TraceAnchors,
    analyze,
    assign_receivers,
    method_correlations,
)
from mechlens.studies.anchors.compare import category_means, lower_triangle, spearman
from mechlens.studies.anchors.receivers import (
    kurtosis,
    receiver_heads,
    receiver_scores,
    sentence_attention,
    vertical_scores,
)
from mechlens.studies.anchors.resampling import (
    ANCHORS_SAMPLING,
    FORCED_SAMPLING,
    ForcedAnswers,
    Resampling,
    Rollout,
    answer_kl,
    correct_kl,
    forced_answers,
    resample,
    resampling_matrix,
    sentence_embedder,
)
from mechlens.studies.anchors.suppression import (
    authors_token_spans,
    nucleus_kl,
    outgoing_effect,
    suppression_matrix,
    token_kl,
)
from mechlens.studies.anchors.taxonomy import CATEGORIES, classify_sentence, label_sentences, model_labeller

__all__ = [
    "ANCHORS_SAMPLING",
    "CATEGORIES",
    "FORCED_SAMPLING",
    "METHODS",
    "TraceAnchors",
    "analyze",
    "assign_receivers",
    "method_correlations",
    "ForcedAnswers",
    "Resampling",
    "Rollout",
    "answer_kl",
    "authors_token_spans",
    "correct_kl",
    "category_means",
    "classify_sentence",
    "forced_answers",
    "kurtosis",
    "label_sentences",
    "lower_triangle",
    "model_labeller",
    "nucleus_kl",
    "outgoing_effect",
    "receiver_heads",
    "receiver_scores",
    "resample",
    "resampling_matrix",
    "sentence_attention",
    "sentence_embedder",
    "spearman",
    "suppression_matrix",
    "token_kl",
    "vertical_scores",
]
