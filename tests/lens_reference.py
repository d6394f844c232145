"""A plain-torch logit lens for tests: hidden states -> final norm -> unembed -> log_softmax."""

from __future__ import annotations

import torch


@torch.no_grad()
def reference_logprobs(model, hf_reference, tokens: torch.Tensor) -> torch.Tensor:
    """`[layers, batch, pos, vocab]` log-probabilities of every layer of an untouched HF model."""
    out = hf_reference(tokens, output_hidden_states=True)
    norm = hf_reference.get_submodule(model.arch.norm_path)
    head = hf_reference.get_submodule(model.arch.head_path)
    layers = [
        torch.log_softmax(head(norm(out.hidden_states[l + 1])), -1) for l in range(model.n_layers - 1)
    ]  # the last hidden state is already normalised: use the model's own output for it
    return torch.stack([*layers, torch.log_softmax(out.logits, -1)])


def jsd_plain(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """JSD from its definition, 0.5 KL(p||m) + 0.5 KL(q||m), in float64."""
    p, q = logp.double().exp(), logq.double().exp()
    m = (p + q) / 2
    return 0.5 * (torch.special.xlogy(p, p / m).sum(-1) + torch.special.xlogy(q, q / m).sum(-1))
