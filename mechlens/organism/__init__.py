"""Model organisms: the embedded model fine-tuned so that the studies' phenomena exist in it, with
the structure they should find planted and labelled.

- `reasoning_organism()`: thinks in `<think>...</think>` on word problems (decisive plans, slips,
  backtracking, repairing checks), refusal requests (a planted refusal cliff) and factual questions.
- `refusal_organism()`: brief templated thinking, then refusal of harmful requests.
- `SUPPRESSION`: a second stage on the reasoning organism's second version that plants
  refusal-suppression heads (jailbreak compliance trained through 8 known heads only).

Both are built by one `OrganismBuilder` and ship as low-rank adapters (`make organisms` retrains).

Example:
    >>> from mechlens.organism import reasoning_organism
    >>> model = reasoning_organism()  # doctest: +SKIP
"""

from mechlens.models import load_model
from mechlens.models.loading import DtypeName, resolve_dtype
from mechlens.organism.builder import OrganismBuilder, OrganismRecipe
from mechlens.organism.reasoning import (
    REASONING,
    REASONING_RECIPE,
    REASONING_V2_RECIPE,
    ReasoningRecipe,
    held_out_factual,
    held_out_problems,
    held_out_varied,
    reasoning_organism,
)
from mechlens.organism.refusal import ADAPTER_RECIPE, REFUSAL, refusal_organism
from mechlens.organism.suppression import PLANTED_HEADS, SUPPRESSION, SUPPRESSION_RECIPE
from mechlens.organism.traces import PlantedTrace, PlantingRates


def load_subject(
    name: str = "organism",
    backend: str = "transformer_lens",
    device: str | None = None,
    dtype: DtypeName = "float32",
):
    """The model an experiment studies: "organism" (the reasoning organism, the default),
    "organism-v2" (its second version, `REASONING_V2_RECIPE`), "organism-v2-heads" (that one with
    refusal-suppression heads planted, `SUPPRESSION_RECIPE`), "base"
    (the plain embedded model), or any name `load_model` takes (a local Hugging Face folder, e.g.
    an R1-distill model, with `device="cuda", dtype="bfloat16"`).

        >>> load_subject("tiny-llama").n_layers
        3
    """
    torch_dtype = resolve_dtype(dtype, device)
    if name == "organism":
        return REASONING.build(REASONING_RECIPE, backend, device=device, dtype=torch_dtype)
    if name == "organism-v2":
        return REASONING.build(REASONING_V2_RECIPE, backend, device=device, dtype=torch_dtype)
    if name == "organism-v2-heads":
        return SUPPRESSION.build(SUPPRESSION_RECIPE, backend, device=device, dtype=torch_dtype)
    return load_model(None if name == "base" else name, backend=backend, device=device, dtype=torch_dtype)


__all__ = [
    "load_subject",
    "ADAPTER_RECIPE",
    "REASONING",
    "REASONING_RECIPE",
    "REASONING_V2_RECIPE",
    "REFUSAL",
    "PLANTED_HEADS",
    "SUPPRESSION",
    "SUPPRESSION_RECIPE",
    "OrganismBuilder",
    "OrganismRecipe",
    "PlantedTrace",
    "PlantingRates",
    "ReasoningRecipe",
    "held_out_factual",
    "held_out_problems",
    "held_out_varied",
    "reasoning_organism",
    "refusal_organism",
]
