"""Stepwise values (GLoRe's stepwise outcome reward models, seed 001): V_k from the rollouts the
thought-anchors resampling already drew, value probes on the hidden state at the end of each
step, and the first step below a threshold as the error's place.

- `values`: `step_values`, `first_below`, `step_features`, `ValueProbe`, `localisation_null`;
- `study`: SORM and ORM probes fitted leave-one-trace-out, localisation against planted errors
  (`analyze` -> `StepwiseStudy`).

Example:
    >>> from mechlens.studies import stepwise
    >>> stepwise.first_below([0.9, 0.4, 0.1], threshold=0.5)
    1
"""

from mechlens.studies.stepwise.study import LOCALISERS, StepwiseStudy, analyze
from mechlens.studies.stepwise.values import (
    ValueProbe,
    first_below,
    localisation_null,
    step_features,
    step_values,
)

__all__ = [
    "LOCALISERS",
    "StepwiseStudy",
    "ValueProbe",
    "analyze",
    "first_below",
    "localisation_null",
    "step_features",
    "step_values",
]
