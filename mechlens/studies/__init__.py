"""Studies, one package each, reproducing a paper on any HookedModel: `depth` (Reasoning Score and
hallucination detection), `refusal` (refusal cliffs), `anchors` (thought anchors).

A new study is a folder here with an `analyze`-style entry point that the CLI and its experiment
script both call."""

from mechlens.studies import anchors, depth, refusal

__all__ = ["anchors", "depth", "refusal"]
