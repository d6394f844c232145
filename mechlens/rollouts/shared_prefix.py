"""`SharedPrefixEngine`: in-process sampling near this machine's bound, for resampling.

Resampling continues many rows from prompts that are prefixes of one another (the cut points of
one trace), so the engine computes each distinct prompt's keys and values once and every row
attends to them in place:

- prompts that are prefixes of a longer prompt form one chain; each chain runs one forward, which
  gives every member's last-position logits and the shared keys and values; with one chain every
  row reads them in place, with several each slot holds a copy of its prompt's (one batched
  attention for all slots, at most `PROMPT_CACHE_BYTES`);
- rows (prompt, sample) decode in `slots` batch rows at once (continuous batching: a finished row's
  slot takes the next row; once the queue is empty the last live rows move into freed slots, so no
  step computes an idle row), each row's own new tokens in a preallocated cache;
- attention of a row = softmax over [its prompt's shared keys | its own new keys];
- sampling draws a counter-based uniform per (row seed, step), so a row's tokens depend only on its
  seed, not on the batch; top-p samples from a top-`top_k` prefilter, exact whenever the nucleus
  lies inside it (checked on every row with bounds on the tail mass; the other rows fall back to
  the full vocabulary).

The forward is written out for Llama-style decoders (Llama, Mistral, Qwen2, Qwen3: RMSNorm, rotary
positions, grouped-query attention, gated MLP) on the model's own weights, in `dtype` ("auto":
bfloat16 where the CPU multiplies it fast). In float32 its logits equal the Hugging Face model's
(`tests/test_shared_prefix.py`). No hooks run; of the interventions in force it applies one kind
itself, a direction added to the residual stream at every position (`model.add_direction` without
`positions`: steering, `mechlens.studies.steering`), and refuses any other (sample with
`LocalEngine` inside the context). The rows are samples of the same distribution as `generate`'s,
not the same draws.

Example:
    >>> import mechlens as ml
    >>> from mechlens.rollouts import SharedPrefixEngine
    >>> engine = SharedPrefixEngine(ml.load_model("tiny-llama"), dtype="float32")
    >>> out = engine.sample([[5, 6, 7], [5, 6]], ml.Sampling(max_new_tokens=3, n=2, temperature=0))
    >>> len(out), len(out[0]), len(out[0][0]) <= 3
    (2, 2, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.nn.functional import linear
from tqdm.auto import tqdm

from mechlens.models.interventions import DirectionAddition
from mechlens.models.loading import DtypeName, resolve_dtype
from mechlens.models.sampling import Sampling, check_int, row_seed
from mechlens.rollouts.engines import check_request, cut_at_stop

if TYPE_CHECKING:
    from mechlens.models.hooked import HookedModel

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""The Hugging Face `model_type`s whose forward `SharedPrefixEngine` writes out."""

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def step_uniforms(seeds: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """A uniform in [0, 1) for each (row seed, step) pair: splitmix64 of both, 53 bits.

    The same pair always gives the same number, on any machine.

        >>> u = step_uniforms(np.array([1, 1, 2], np.uint64), np.array([0, 1, 0], np.uint64))
        >>> bool(((0 <= u) & (u < 1)).all()), len(set(u.tolist()))
        (True, 3)
    """
    with np.errstate(over="ignore"):
        x = seeds.astype(np.uint64) * _GOLDEN + steps.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
        for _ in range(2):
            x = x + _GOLDEN
            x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


def sample_rows(
    logits: Tensor,
    temperature: float,
    top_p: float,
    uniforms: Tensor,
    top_k: int = 64,
    work: Tensor | None = None,
) -> Tensor:
    """One token per row of `logits [rows, vocab]` by inverse transform of `uniforms [rows]`:
    greedy at temperature 0, else temperature + nucleus (top-p) sampling with the nucleus of
    `generation.sample_next` (the tokens whose higher-ranked mass is below `top_p`).

    Every row's normaliser is exact (one float32 pass over its vocabulary); the nucleus is looked
    for among the `top_k` most likely tokens, then among `FALLBACK_K`, and a row whose nucleus is
    wider still sorts its whole vocabulary. Each step is exact, so `top_k` changes only the time.
    `work`: a float32 buffer of the logits' shape to compute in (the engine's own, reused every
    step: a fresh `[rows, vocab]` block costs more in page faults than the pass itself).

        >>> z = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
        >>> sample_rows(z, 0.0, 1.0, torch.tensor([0.5, 0.5])).tolist()
        [1, 0]
        >>> sample_rows(z, 1.0, 0.5, torch.tensor([0.99, 0.99]), top_k=2).tolist()  # nucleus: top token
        [1, 0]
    """
    rows_all, vocab = logits.shape
    top = logits.amax(-1).float()  # [rows]; NaN anywhere in a row propagates here
    if not torch.isfinite(top).all():
        raise ValueError("the next-token logits are not finite: nothing can be sampled from them")
    if temperature == 0:
        return logits.argmax(-1)
    if work is None or work.shape != logits.shape or work.dtype != torch.float32:
        work = torch.empty(logits.shape, dtype=torch.float32)
    e = work.copy_(logits).sub_(top[:, None]).mul_(1 / temperature).exp_()  # [rows, vocab], max 1
    z = e.sum(-1).double()  # [rows], exact normalisers (float32 pairwise sums of terms <= 1)
    u = uniforms.to(torch.float64) * z  # the inverse-transform targets, in unnormalised mass
    if top_p >= 1:
        cdf = e.cumsum(-1, dtype=torch.float64)
        return torch.searchsorted(cdf, u[:, None], right=True)[:, 0].clamp(max=vocab - 1)
    out = torch.empty(rows_all, dtype=torch.long)
    todo = torch.arange(rows_all)
    for k in (min(top_k, vocab), min(max(top_k, FALLBACK_K), vocab), vocab):
        if len(todo) == 0:
            break
        rows = e if len(todo) == rows_all else e[todo]  # [len(todo), vocab]
        vals, idx = rows.topk(k, -1) if k < vocab else rows.sort(-1, descending=True)
        mass = vals.double()
        before = mass.cumsum(-1) - mass  # mass ranked above each candidate
        kept = (before < top_p * z[todo, None]).sum(-1)  # [len(todo)] >= 1
        inside = (kept < k) | (k == vocab)
        if inside.any():
            r = inside.nonzero()[:, 0]
            cdf = (mass[r] * (torch.arange(k)[None] < kept[r, None])).cumsum(-1)
            target = u[todo[r]] * (cdf[:, -1] / z[todo[r]])  # the same uniform, on the nucleus's mass
            pick = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
            out[todo[r]] = idx[r, torch.minimum(pick, kept[r] - 1)]
        todo = todo[~inside]
    return out


FALLBACK_K = 1024
"""The second, wider candidate set of `sample_rows` (before a full sort)."""

PROMPT_CACHE_BYTES = 2 * 2**30
"""With several distinct prompts, each slot holds its prompt's keys and values: fewer slots run at
once where `slots` of them would take more memory than this (the rows are the same)."""


@dataclass
class _Weights:
    """One decoder's weights in the engine's dtype (views of the model's when the dtypes agree; the
    stacked q/k/v and gate/up weights are copies)."""

    embed: Tensor  # [vocab, d]
    layers: list[dict[str, Tensor | None]]
    norm: Tensor  # [d]
    unembed: Tensor  # [vocab, d]
    eps: float
    n_heads: int
    n_kv: int
    head_dim: int


def _rms(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """RMSNorm as Hugging Face computes it: statistics in float32, weight in the model's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


class SharedPrefixEngine:
    """Batched sampling on shared prompt keys and values (see the module docstring).

    Args:
        model: a `HookedModel` of a Llama-style decoder (`MODEL_TYPES`).
        dtype: the dtype it computes in: "auto" (bfloat16 where fast, `load_model`'s rule),
            "float32", "bfloat16", "float16". Weights are converted at each `sample` call when it
            differs from the model's (so later weight edits are seen).
        slots: rows decoded at once.
        top_k: the nucleus prefilter's width (any value gives the same distribution; it changes
            only how often a row falls back to its whole vocabulary).
        progress: a progress bar of sampled rows (stderr).
    """

    name = "shared-prefix"
    prompts_per_call = 256

    def __init__(
        self,
        model: HookedModel,
        dtype: DtypeName | torch.dtype = "auto",
        slots: int = 256,
        top_k: int = 64,
        progress: bool = False,
    ):
        config = model.plain_model.config
        kind = getattr(config, "model_type", None)
        if kind not in MODEL_TYPES:
            raise ValueError(
                f"SharedPrefixEngine writes out the forward of {MODEL_TYPES} decoders; model {model.name!r} "
                f"is {kind!r}: sample it with LocalEngine"
            )
        if model.device.type != "cpu":
            raise ValueError(
                f"SharedPrefixEngine runs on the CPU; model {model.name!r} is on {model.device}: sample it "
                "with LocalEngine (or a vLLM engine) there"
            )
        self.model, self.dtype = model, resolve_dtype(dtype, model.device)
        self.slots = check_int("slots", slots, 1)
        self.top_k = check_int("top_k", top_k, 1)
        self.progress = progress
        self._window: int | None = None  # the sliding window, read with the weights

    def applies(self, model: HookedModel) -> bool:
        """Whether this engine applies every intervention in force on `model` itself: directions
        added to the residual stream at every position (`add_direction` without `positions`)."""
        return model is self.model and all(
            isinstance(it, DirectionAddition) and it.positions is None for it in model.active_interventions
        )

    def _steering(self) -> dict[int, Tensor]:
        """Layer -> the sum of the directions added after it (`[d_model]`, in the engine's dtype)."""
        out: dict[int, Tensor] = {}
        for it in self.model.active_interventions:
            assert isinstance(it, DirectionAddition)  # checked by `applies`
            vector = it.scale * it.direction.detach().float().cpu()
            out[it.layer] = out.get(it.layer, torch.zeros_like(vector)) + vector
        return {layer: vector.to(self.dtype) for layer, vector in out.items()}

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "model": self.model.name,
            "dtype": str(self.dtype).removeprefix("torch."),
            "sampler": "splitmix64-inverse-cdf",
        }

    # -- weights and forward -------------------------------------------------------------------
    def _weights(self) -> _Weights:
        hf: Any = self.model.plain_model  # a Hugging Face *ForCausalLM (checked in __init__)
        config, core = hf.config, hf.model
        window = getattr(config, "sliding_window", None)
        if window is not None and getattr(config, "use_sliding_window", True):
            self._window = int(window)
        else:
            self._window = None
        dt = self.dtype

        def cast(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().to(dt)

        def joined(*linears: Any) -> tuple[Tensor, Tensor | None]:
            """The weight `[sum out, in]` and bias of linears that read the same input, stacked into
            one matmul (a bias of zeros for those without one, None when none has one)."""
            weight = torch.cat([m.weight.detach().to(dt) for m in linears])
            if all(m.bias is None for m in linears):
                return weight, None
            return weight, torch.cat(
                [
                    torch.zeros(m.out_features, dtype=dt) if m.bias is None else m.bias.detach().to(dt)
                    for m in linears
                ]
            )

        layers = []
        for block in core.layers:
            attn, mlp = block.self_attn, block.mlp
            qkv, qkv_bias = joined(attn.q_proj, attn.k_proj, attn.v_proj)
            gate_up, gate_up_bias = joined(mlp.gate_proj, mlp.up_proj)
            layers.append(
                {
                    "ln1": cast(block.input_layernorm.weight),
                    "ln2": cast(block.post_attention_layernorm.weight),
                    "qkv": qkv, "qkvb": qkv_bias,
                    "o": cast(attn.o_proj.weight), "ob": cast(attn.o_proj.bias),
                    "qn": cast(getattr(getattr(attn, "q_norm", None), "weight", None)),
                    "kn": cast(getattr(getattr(attn, "k_norm", None), "weight", None)),
                    "gate_up": gate_up, "gub": gate_up_bias,
                    "down": cast(mlp.down_proj.weight), "db": cast(mlp.down_proj.bias),
                }
            )  # fmt: skip
        self._act = core.layers[0].mlp.act_fn
        self._rotary = core.rotary_emb
        n_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        embed, unembed, norm = cast(core.embed_tokens.weight), cast(hf.lm_head.weight), cast(core.norm.weight)
        assert embed is not None and unembed is not None and norm is not None
        return _Weights(embed, layers, norm, unembed, float(config.rms_norm_eps), n_heads,
                        config.num_key_value_heads, head_dim)  # fmt: skip

    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin `[len(positions), head_dim]` in the engine's dtype."""
        probe = torch.zeros(1, dtype=torch.float32)
        cos, sin = self._rotary(probe, positions[None].long())
        return cos[0].to(self.dtype), sin[0].to(self.dtype)

    def _qkv(self, w: _Weights, layer: dict, x: Tensor, cos: Tensor, sin: Tensor):
        """Queries `[..., heads, hd]`, keys and values `[..., kv, hd]` of residuals `x [..., d]`."""
        h = _rms(x, layer["ln1"], w.eps)
        q, k, v = linear(h, layer["qkv"], layer["qkvb"]).split(
            (w.n_heads * w.head_dim, w.n_kv * w.head_dim, w.n_kv * w.head_dim), -1
        )  # one matmul for the three projections
        q = q.unflatten(-1, (w.n_heads, w.head_dim))
        k, v = k.unflatten(-1, (w.n_kv, w.head_dim)), v.unflatten(-1, (w.n_kv, w.head_dim))
        if layer["qn"] is not None:
            q, k = _rms(q, layer["qn"], w.eps), _rms(k, layer["kn"], w.eps)
        return (
            _rotate(q, cos[..., None, :], sin[..., None, :]),
            _rotate(k, cos[..., None, :], sin[..., None, :]),
            v,
        )

    def _finish(self, w: _Weights, layer: dict, x: Tensor, attn: Tensor) -> Tensor:
        """The residual after the attention output `attn [..., heads*hd]` and the MLP."""
        x = x + linear(attn, layer["o"], layer["ob"])
        h = _rms(x, layer["ln2"], w.eps)
        gate, up = linear(h, layer["gate_up"], layer["gub"]).chunk(2, -1)  # one matmul for both
        return x + linear(self._act(gate) * up, layer["down"], layer["db"])

    def _prefill(
        self, w: _Weights, ids: list[int], steer: dict[int, Tensor] | None = None
    ) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
        """Keys and values `[kv, len, hd]` per layer of one prompt, and its logits `[len, vocab]`
        (float32); `steer[layer]` is added to the residual leaving that block."""
        steer = steer or {}
        tokens = torch.tensor(ids)
        x = w.embed[tokens]  # [len, d]
        cos, sin = self._rope(torch.arange(len(ids)))
        group = w.n_heads // w.n_kv
        causal = torch.full((len(ids), len(ids)), float("-inf")).triu(1)
        kv = []
        for li, layer in enumerate(w.layers):
            q, k, v = self._qkv(w, layer, x, cos, sin)  # [len, heads|kv, hd]
            k, v = k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()  # [kv, len, hd]
            kv.append((k, v))
            qg = q.transpose(0, 1).unflatten(0, (w.n_kv, group))  # [kv, group, len, hd]
            scores = (qg @ k[:, None].transpose(-1, -2)).float() / math.sqrt(w.head_dim) + causal
            out = scores.softmax(-1).to(self.dtype) @ v[:, None]  # [kv, group, len, hd]
            x = self._finish(w, layer, x, out.flatten(0, 1).transpose(0, 1).flatten(1))
            if li in steer:
                x = x + steer[li]
        logits = linear(_rms(x, w.norm, w.eps), w.unembed, None).float()
        return kv, logits

    # -- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: Sampling,
        seeds: Sequence[int] | None = None,
        stop: Sequence[str] = (),
    ) -> list[list[list[int]]]:
        """`sampling.n` continuations (token ids) of each prompt (token ids); sample j of prompt i
        draws from `row_seed(seeds[i], j)` (default seeds: `prompt_seeds`)."""
        if not self.applies(self.model):
            raise ValueError(
                "an intervention is active on the model that SharedPrefixEngine does not apply (it adds "
                "directions at every position, nothing else): sample with LocalEngine(model) inside the "
                "context, or leave the context"
            )
        ids, seeds, stop = check_request(prompts, sampling, seeds, stop, self.model.d_vocab)
        longest = max(len(p) for p in ids) + sampling.max_new_tokens
        if longest > self.model.n_ctx:
            raise ValueError(
                f"a prompt of {longest - sampling.max_new_tokens} tokens + max_new_tokens "
                f"({sampling.max_new_tokens}) exceeds the context window ({self.model.n_ctx})"
            )
        w = self._weights()
        if self._window is not None and longest > self._window:
            raise ValueError(
                f"prompt + max_new_tokens ({longest}) exceeds the sliding window ({self._window})"
            )
        out = self._decode(w, ids, seeds, sampling)
        decode = self.model.tokenizer.decode
        return [[cut_at_stop(row, decode, stop) for row in rows] for rows in out]

    def _decode(
        self, w: _Weights, ids: list[list[int]], seeds: list[int], sampling: Sampling
    ) -> list[list[list[int]]]:
        # chains: each distinct prompt joins the longest prompt it is a prefix of
        heads: list[list[int]] = []
        chain_of: dict[tuple[int, ...], int] = {}
        for p in sorted({tuple(p) for p in ids}, key=len, reverse=True):
            c = next((j for j, h in enumerate(heads) if len(h) >= len(p) and tuple(h[: len(p)]) == p), None)
            if c is None:
                c = len(heads)
                heads.append(list(p))
            chain_of[p] = c
        steer = self._steering()
        kv, first_logits = [], {}
        for c, head in enumerate(heads):
            layers_kv, logits = self._prefill(w, head, steer)
            kv.append(layers_kv)
            for p, cc in chain_of.items():
                if cc == c:
                    first_logits[p] = logits[len(p) - 1]
        per_prompt, max_new = sampling.n, sampling.max_new_tokens
        queue = [(i, j) for i in range(len(ids)) for j in range(per_prompt)]  # rows, prompt-major
        results: list[list[list[int]]] = [[[] for _ in range(per_prompt)] for _ in ids]
        eos = self.model.tokenizer.eos_token_id if sampling.stop_at_eos else None
        slots = min(self.slots, len(queue))
        group, hd = w.n_heads // w.n_kv, w.head_dim
        layers = len(w.layers)
        # several chains (distinct prompts): each slot holds its prompt's keys and values, so that a
        # step attends to every slot's prompt in one batched product instead of a loop over chains
        per_slot = len(heads) > 1
        if per_slot:
            longest = max(len(h) for h in heads)
            slot_bytes = 2 * layers * w.n_kv * longest * hd * w.embed.element_size()
            slots = max(1, min(slots, PROMPT_CACHE_BYTES // slot_bytes))  # the rows are the same
            chain_k = [torch.stack([k for k, _ in layers_kv]) for layers_kv in kv]  # [layers, kv, L, hd]
            chain_v = [torch.stack([v for _, v in layers_kv]) for layers_kv in kv]
        prompt_k = torch.zeros(layers, slots if per_slot else 0, w.n_kv, longest if per_slot else 0, hd,
                               dtype=self.dtype)  # fmt: skip
        prompt_v = torch.zeros_like(prompt_k)
        cache_k = torch.zeros(layers, slots, w.n_kv, max_new, hd, dtype=self.dtype)
        cache_v = torch.zeros_like(cache_k)
        # slots 0..live-1 hold rows; a slot whose row ends with the queue empty takes the state of
        # the last live slot, so that every step computes `live` rows, never idle ones
        row = [-1] * slots  # queue index in each slot
        chain = torch.zeros(slots, dtype=torch.long)
        plen = torch.zeros(slots, dtype=torch.long)  # prompt length
        t = torch.zeros(slots, dtype=torch.long)  # new tokens so far
        seed = np.zeros(slots, dtype=np.uint64)
        # [slots, vocab] buffers reused every step (fresh blocks of this size cost page faults)
        logits = torch.zeros(slots, w.embed.shape[0], dtype=self.dtype)
        spare = torch.empty_like(logits)  # the next step's logits, swapped with `logits`
        work = torch.empty(logits.shape, dtype=torch.float32)  # sample_rows's
        fed = torch.zeros(slots, dtype=torch.long)  # each slot's token for the next forward
        nxt = 0
        bar = tqdm(total=len(queue), desc="sample", disable=not self.progress)

        def fill(s: int) -> None:
            nonlocal nxt
            i, j = queue[nxt]
            p = tuple(ids[i])
            row[s], chain[s], plen[s], t[s] = nxt, chain_of[p], len(p), 0
            seed[s] = np.uint64(row_seed(seeds[i], j))
            logits[s] = first_logits[p].to(logits.dtype)
            if per_slot:
                prompt_k[:, s, :, : len(p)] = chain_k[chain_of[p]][:, :, : len(p)]
                prompt_v[:, s, :, : len(p)] = chain_v[chain_of[p]][:, :, : len(p)]
            nxt += 1

        def move(src: int, dst: int) -> None:
            row[dst] = row[src]
            for state in (chain, plen, t, fed, logits):
                state[dst] = state[src]
            seed[dst] = seed[src]
            cache_k[:, dst], cache_v[:, dst] = cache_k[:, src], cache_v[:, src]
            if per_slot:
                prompt_k[:, dst], prompt_v[:, dst] = prompt_k[:, src], prompt_v[:, src]

        for s in range(slots):
            fill(s)
        live = slots
        scale = 1 / math.sqrt(hd)
        while live:
            u = torch.from_numpy(step_uniforms(seed[:live], t[:live].numpy().astype(np.uint64)))
            tokens = sample_rows(
                logits[:live], sampling.temperature, sampling.top_p, u, self.top_k, work[:live]
            )
            fresh, idle = set(), []
            for s, tok in enumerate(tokens.tolist()):
                i, j = queue[row[s]]
                if tok == eos:
                    done = True
                else:
                    results[i][j].append(tok)
                    done = len(results[i][j]) >= max_new
                if not done:
                    fed[s] = tok
                    continue
                bar.update(1)
                if nxt < len(queue):
                    fill(s)
                    fresh.add(s)
                else:
                    idle.append(s)
            if idle:  # compact: the last live slots move into the idle ones below them
                keep = live - len(idle)
                movers = [s for s in range(keep, live) if s not in idle]
                # (a fresh slot is never a mover: this step's fills all come before its first idle slot)
                for dst, src in zip([s for s in idle if s < keep], movers, strict=True):
                    move(src, dst)
                live = keep
            step_slots = [s for s in range(live) if s not in fresh]
            if not step_slots:  # only fresh rows: their first tokens come from their prompts' logits
                continue
            # one decode step for the live slots (fresh slots compute and are ignored)
            n = live
            tn = t[:n]
            cos, sin = self._rope(plen[:n] + tn)
            x = w.embed[fed[:n]]  # [n, d]
            slot_ix = torch.arange(n)
            width = int(tn.max()) + 1
            inf = float("-inf")
            own_bias = torch.where(torch.arange(width)[None] <= tn[:, None], 0.0, inf).to(self.dtype)
            own_bias = own_bias[:, None, None]  # [n, 1, 1, width]: each row's own new keys so far
            length = int(plen[:n].max())  # the prompt keys any live row reads
            prompt_mask = torch.where(torch.arange(length)[None] < plen[:n, None], 0.0, inf).to(self.dtype)
            for li, layer in enumerate(w.layers):
                q, k, v = self._qkv(w, layer, x, cos, sin)  # [n, heads|kv, hd]
                cache_k[li, slot_ix, :, tn] = k
                cache_v[li, slot_ix, :, tn] = v
                qg = q.unflatten(1, (w.n_kv, group)) * scale  # [n, kv, group, hd]
                ks, vs = cache_k[li, :n, :, :width], cache_v[li, :n, :, :width]  # [n, kv, width, hd]
                own = (qg @ ks.transpose(-1, -2)).add_(own_bias)  # [n, kv, group, width]
                # softmax over [prompt keys | own keys]; in the engine's dtype, accumulated in float32
                if per_slot:
                    pk, pv = prompt_k[li, :n, :, :length], prompt_v[li, :n, :, :length]  # [n, kv, L, hd]
                    shared = (qg @ pk.transpose(-1, -2)).add_(prompt_mask[:, None, None])  # [n, kv, g, L]
                    probs = torch.cat([shared, own], -1).softmax(-1)  # [n, kv, g, L + width]
                    attn = probs[..., :length] @ pv + probs[..., length:] @ vs  # [n, kv, g, hd]
                else:  # one chain: every row reads the same prompt keys in place
                    pk, pv = kv[0][li]  # [kv, L, hd]
                    qc = qg.permute(1, 0, 2, 3).reshape(w.n_kv, n * group, hd)
                    shared = (qc @ pk[:, :length].transpose(-1, -2)).view(w.n_kv, n, group, length)
                    shared = shared.add_(prompt_mask[None, :, None])  # [kv, n, g, L]
                    probs = torch.cat([shared, own.permute(1, 0, 2, 3)], -1).softmax(-1)  # [kv, n, g, L + w]
                    part = probs[..., :length].reshape(w.n_kv, n * group, length) @ pv[:, :length]
                    attn = part.view(w.n_kv, n, group, hd).permute(1, 0, 2, 3) + (
                        probs[..., length:].permute(1, 0, 2, 3) @ vs
                    )  # [n, kv, g, hd]
                x = self._finish(w, layer, x, attn.flatten(1))
                if li in steer:
                    x = x + steer[li]
            torch.mm(_rms(x, w.norm, w.eps), w.unembed.T, out=spare[:n])  # [n, vocab]
            if fresh:  # fresh slots sample their first token from their prompt's logits
                back = torch.tensor(sorted(fresh))
                spare[back] = logits[back]
            logits, spare = spare, logits
            t[torch.tensor(step_slots)] += 1
        bar.close()
        return results
