"""Studies, one package each, reproducing a paper on any HookedModel: `depth` (Reasoning Score and
hallucination detection), `refusal` (refusal cliffs), `anchors` (thought anchors), `echoes`
(echoes of the prompt), `stepwise` (stepwise values, SORMs), `budget` (sequential vs parallel at
a fixed budget), `evolution` (self-evolving chains), and the interventions beyond the papers:
`steering` (behaviour directions and steering curves) and `patching` (sentence patching
between traces).

A new study is a folder here with an `analyze`-style entry point that the CLI and its experiment
script both call."""

from mechlens.studies import anchors, budget, depth, echoes, evolution, patching, refusal, steering, stepwise

__all__ = ["anchors", "budget", "depth", "echoes", "evolution", "patching", "refusal", "steering", "stepwise"]
