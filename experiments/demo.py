"""Quick demo on the embedded model: a logit-lens heatmap and an attention pattern of one prompt.

python experiments/demo.py [--model PATH] [--backend nnsight] [--out figures/demo]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import mechlens as ml
from mechlens.plots import attention_heatmap, lens_heatmap
from mechlens.runs import Run, parse_config
from mechlens.text.thinking import format_prompt


@dataclass
class DemoConfig:
    model: str = "smollm2-135m-instruct"
    backend: str = "transformer_lens"
    question: str = "What is the capital of France? Answer in one word."
    answer: str = "The capital of France is Paris."
    out: str = "figures/demo"
    seed: int = 0


def previous_token_head(pattern: torch.Tensor) -> tuple[int, int]:
    """(layer, head) whose attention puts the most weight on the previous token.

    pattern: [layers, heads, q, k] for one sequence.
    """
    prev = pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1)  # [layers, heads]
    layer, head = divmod(int(prev.argmax()), prev.shape[1])
    return layer, head


def main(cfg: DemoConfig) -> list:
    model = ml.load_model(cfg.model, backend=cfg.backend)
    run = Run("demo", cfg, cfg.out, model=model, seed=cfg.seed)
    text = format_prompt(model.tokenizer, cfg.question) + cfg.answer
    toks = model.to_tokens(text)
    str_tokens = model.to_str_tokens(toks)

    lens = ml.logit_lens(model, toks)
    top = lens.top1_text(model.tokenizer)
    title = f"Logit lens of {model.name}: entropy by layer and position (hover: top-1 token)"
    fig = lens_heatmap(lens.entropy[:, 0], top, str_tokens, lens.layers, title=title)
    run.save_figure(
        fig, "logit_lens", caption="Logit-lens entropy per layer and position; hover for top tokens."
    )

    _, cache = model.run_with_cache(toks, ["pattern"], return_logits=False)
    pattern = cache["pattern"][:, 0]  # [layers, heads, q, k]
    layer, head = previous_token_head(pattern[1:])
    layer += 1  # layer 0 skipped: its heads are mostly positional
    title = f"Attention of L{layer}H{head} (strongest previous-token head)"
    fig = attention_heatmap(pattern[layer, head], str_tokens, title=title)
    run.save_figure(fig, "attention_pattern", caption=f"Attention pattern of head L{layer}H{head}.")
    prev = float(pattern[layer, head].diagonal(offset=-1).mean())
    entropy = lens.entropy[:, 0]  # [layers, pos]
    run.summarize(
        "Demo: logit lens and attention of one prompt",
        [
            f"logit lens over {len(lens.layers)} layers x {toks.shape[1]} positions: mean entropy "
            f"{float(entropy[0].mean()):.2f} nats at layer {lens.layers[0]}, {float(entropy[-1].mean()):.2f} "
            f"at layer {lens.layers[-1]}",
            f"strongest previous-token head: L{layer}H{head} (attention to the previous token {prev:.2f})",
        ],
    )
    return run.outputs


if __name__ == "__main__":
    main(parse_config(DemoConfig, description=__doc__))
