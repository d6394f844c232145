"""`python -m mechlens.organism [NAME ...]`: retrain the shipped organism adapters (from the base
model, or from the stage they build on; NAME: reasoning, reasoning-v2, suppression-refuse,
suppression, refusal; default all, in that order) and write them with provenance (`make
organisms`; minutes on 2 cores)."""

import sys

from mechlens.organism import (
    ADAPTER_RECIPE,
    REASONING,
    REASONING_RECIPE,
    REASONING_V2_RECIPE,
    REFUSAL,
    SUPPRESSION,
    SUPPRESSION_RECIPE,
)
from mechlens.organism.suppression import REFUSE_RECIPE

BUILDS = {
    "reasoning": (REASONING, REASONING_RECIPE),
    "reasoning-v2": (REASONING, REASONING_V2_RECIPE),
    "suppression-refuse": (SUPPRESSION, REFUSE_RECIPE),
    "suppression": (SUPPRESSION, SUPPRESSION_RECIPE),
    "refusal": (REFUSAL, ADAPTER_RECIPE),
}

if __name__ == "__main__":
    names = sys.argv[1:] or list(BUILDS)
    unknown = [n for n in names if n not in BUILDS]
    if unknown:
        raise SystemExit(f"unknown organisms {unknown}: choose from {list(BUILDS)}")
    for name in names:
        builder, recipe = BUILDS[name]
        print(builder.ship(recipe))
