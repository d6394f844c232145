"""Echoes as Anchors: the echo of the prompt in a reasoning trace (hhh2210/echoes-as-anchors).

- `echo`: echo detection by word overlap with the question, and trimming (`echo_span`,
  `trim_echo`, the authors' rule or ours);
- `measures`: the Echo Likelihood Gap (`likelihood_gap`) and attention refocusing (`refocusing`);
- `probe`: the paper's echo detector, an MLP on sentence embeddings (`EchoProbe`);
- `study`: the whole study of one model (`analyze` -> `EchoStudy`), with Echoic Prompting.

Example:
    >>> from mechlens.studies import echoes
    >>> echoes.is_echo("How many apples does Tom have?", "So, how many apples does Tom have?")
    True
"""

from mechlens.studies.echoes.echo import TRIM_RULES, echo_span, is_echo, overlap, trim_echo
from mechlens.studies.echoes.measures import LikelihoodGap, Refocusing, likelihood_gap, refocusing
from mechlens.studies.echoes.probe import EchoProbe, opening_words
from mechlens.studies.echoes.study import (
    ECHO_SAMPLING,
    INJECTION,
    EchoicPrompting,
    EchoReply,
    EchoStudy,
    analyze,
    default_layer_groups,
)

__all__ = [
    "ECHO_SAMPLING",
    "INJECTION",
    "TRIM_RULES",
    "EchoProbe",
    "EchoReply",
    "EchoStudy",
    "EchoicPrompting",
    "LikelihoodGap",
    "Refocusing",
    "analyze",
    "default_layer_groups",
    "echo_span",
    "is_echo",
    "likelihood_gap",
    "opening_words",
    "overlap",
    "refocusing",
    "trim_echo",
]
