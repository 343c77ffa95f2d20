"""The one sampling path of tether (PPO rollouts, evaluation, the CAI stages) and its CPU fast
path, behind one switch; plain Hugging Face sampling is the reference the fast path must agree
with (tests/test_fastpath.py: same log-probs for the same tokens, same sampling distribution).

The fast path is four tricks, each measured against its plain alternative, side by side, by
`benchmarks/cpu_choices.py` (the `--only` name in brackets):

- `head_linear` / `use_head_linear` [head]: the vocabulary-wide lm_head through oneDNN's fp32
  linear, for a frozen fp32 head on CPU. Installed on the model, so the forward passes of the
  update take it too, not only decoding.
- `StepSampler` [sampler]: generate() runs *greedy* over one-hot scores while this logits
  processor draws each token itself by inverse CDF and records the chosen token's log-prob and
  the entropy, so no (b, t, v) logits are kept.
- the static KV cache on CPU [cache].
- `folded_lora` [fold]: each LoRA delta added into its base weight while decoding.

The switch is `enabled`: on unless `fast_path=False` is given to `Policy` / `ChatModel`, or the
environment sets TETHER_FAST_PATH=0. Where it is on, each trick still checks where it applies,
as it always has: the oneDNN head for a frozen fp32 head on CPU only, the static cache on CPU
only, folding neither under FSDP2 (`sharded`), nor for DoRA, nor while the adapter is disabled.
Off, `sample` is `model.generate(do_sample=True, temperature, top_k, top_p, min_new_tokens)` with
`output_logits`, and the log-probs are taken from those logits afterwards: the same distribution
and the same log-probs, a different random stream (torch.multinomial), more time and memory.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from peft.tuners.lora import Linear as LoraLinear
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tether import ppo
from tether.errors import TetherError
from tether.rollout import SamplingParams

ENV_VAR = "TETHER_FAST_PATH"


def enabled(requested: bool | None = None) -> bool:
    """Whether to take the fast path: `requested` where a caller gives it (the `fast_path`
    argument of Policy and ChatModel), else on unless $TETHER_FAST_PATH says 0."""
    if requested is not None:
        return requested
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value in ("0", "false", "off", "no"):
        return False
    if value in ("", "1", "true", "on", "yes"):
        return True
    raise TetherError(f"{ENV_VAR} must be 1 (the fast path, the default) or 0, got {value!r}")


# ----------------------------------------------------------------------------------------------
# the lm_head through oneDNN
# ----------------------------------------------------------------------------------------------

# oneDNN's fp32 linear, where this torch build has it (a private op: probed, never required).
_ONEDNN_LINEAR = (
    getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if torch.backends.mkldnn.is_available()
    else None
)


class _OneDnnLinear(torch.autograd.Function):
    """y = x W^T + b through oneDNN; the backward gives x its gradient only (W and b are frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(weight)
        return _ONEDNN_LINEAR(x.contiguous(), weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return grad @ weight, None, None


def head_linear(head: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The lm_head's forward: oneDNN's linear for a frozen fp32 head on CPU, else nn.Linear's.

    Why: on CPU, torch's fp32 matmul (MKL) is slow for this one shape, a vocabulary-wide output
    (49k x 576 for SmolLM2) from a few rows, both at a decoding step and in an update
    micro-batch, while the other layers' shapes gain little; results agree to float rounding.
    `benchmarks/cpu_choices.py --only head` measures both row counts against F.linear.
    """
    weight, bias = head.weight, head.bias
    if (
        _ONEDNN_LINEAR is None
        or x.device.type != "cpu"
        or not x.dtype == weight.dtype == torch.float32
        or weight.requires_grad
        or (bias is not None and bias.requires_grad)
    ):
        return torch.nn.functional.linear(x, weight, bias)
    return _OneDnnLinear.apply(x, weight, bias)


def use_head_linear(model: torch.nn.Module) -> None:
    """Run the model's lm_head through `head_linear`, unless the head is not a plain nn.Linear
    (a LoRA adapter that wraps the head itself keeps its own forward)."""
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear:
        head.forward = functools.partial(head_linear, head)


# ----------------------------------------------------------------------------------------------
# the sampler
# ----------------------------------------------------------------------------------------------


class StepSampler(LogitsProcessor):
    """generate()'s last logits processor: it draws each next token itself and hands generate()
    a one-hot score, so generate() runs greedy and keeps only the cache and the stopping rules.

    Why not generate()'s own sampling: torch.multinomial draws one exponential per vocabulary
    entry and row, the inverse CDF one uniform per row (`benchmarks/cpu_choices.py --only
    sampler`). And the chosen token's log-prob and the entropy are taken here, step by step, from
    the raw logits / temperature (what `Policy.forward` computes), so no (b, t, v) logits are
    ever kept: at 16 x 48 x 49k that would be 150 MB in fp32, plus the copies that turning them
    into log-probs makes.
    """

    def __init__(self, sampling: SamplingParams, temperature: float, eos_ids: list[int]) -> None:
        self.sampling = sampling
        self.temperature = temperature
        self.eos_ids = eos_ids
        self.warpers: list[LogitsProcessor] = []
        if sampling.top_k > 0:
            self.warpers.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(sampling.top_p))
        self.logprobs: list[torch.Tensor] = []  # per step, (b, 1)
        self.entropy: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float() / self.temperature
        if self.sampling.temperature == self.temperature:
            draw_from = logits.clone()
        else:
            draw_from = scores.float() / self.sampling.temperature
        if len(self.logprobs) < self.sampling.min_new_tokens:
            draw_from[:, self.eos_ids] = -math.inf
        for warp in self.warpers:
            draw_from = warp(input_ids, draw_from)
        if self.sampling.do_sample:
            # float64 running sum: 49k fp32 probabilities would drift by ~1e-4 at the tail
            cdf = torch.softmax(draw_from, -1, dtype=torch.float64).cumsum(-1)
            u = torch.rand(cdf.shape[0], 1, dtype=torch.float64, device=cdf.device) * cdf[:, -1:]
            # right=True: a token with probability 0 owns an empty interval, never drawn
            token = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)
        else:
            token = draw_from.argmax(-1, keepdim=True)
        self.logprobs.append(ppo.logprobs_from_logits(logits.unsqueeze(1), token))
        self.entropy.append(ppo.entropy_from_logits(logits).unsqueeze(-1))
        return torch.full_like(scores, -math.inf).scatter_(-1, token, 0.0)


# ----------------------------------------------------------------------------------------------
# LoRA folded into the base weights
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def folded_lora(model: torch.nn.Module) -> Iterator[None]:
    """For sampling only: add each LoRA delta (B A * scale) of a PEFT `model` into its base
    weight and run the plain layers, then put the saved base weights back bit for bit.

    Why: decoding is one matmul per layer per token, and the two small LoRA matmuls beside each
    one are extra work while the adapter stands still; folding costs one copy of the adapted
    weights. Whether that pays on a given machine: `benchmarks/cpu_choices.py --only fold`
    (README table). Restoring from the copy (not
    subtracting) keeps the reference exact forever. Does nothing for a model without LoRA layers,
    for DoRA (its delta is not B A) and while the adapter is disabled (the reference). Not for an
    FSDP2-sharded model: between forwards a process holds only shards of the weights.
    """
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    dora = any(any(layer.use_dora.values()) for layer in layers)
    disabled = any(layer.disable_adapters for layer in layers)
    if not layers or dora or disabled:
        yield
        return
    saved = []
    with torch.no_grad():
        for layer in layers:
            weight = layer.get_base_layer().weight
            saved.append((weight, weight.detach().clone()))
            for name in layer.active_adapters:
                if name in layer.lora_A:
                    weight.add_(layer.get_delta_weight(name).to(weight.dtype))
    try:
        with model.disable_adapter():
            yield
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


# ----------------------------------------------------------------------------------------------
# the one sampling function
# ----------------------------------------------------------------------------------------------


@dataclass
class Sampled:
    """One batched sampling pass, t steps.

    Fields:
        sequences: what generate() returns: (b, p + t) prompt then response for a causal model,
            (b, 1 + t) decoder start then response for seq2seq; rows that ended are padded.
        logprobs: (b, t) log-prob of each drawn token under softmax(raw logits / temperature),
            before any top-k / top-p / EOS ban (what `Policy.forward` computes); meaningless
            after a row's EOS, which callers mask.
        entropy: (b, t) entropy of that distribution, likewise.
    """

    sequences: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor

    @property
    def response_ids(self) -> torch.Tensor:
        """(b, t) the sampled tokens."""
        return self.sequences[:, self.sequences.shape[1] - self.logprobs.shape[1] :]


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sampling: SamplingParams,
    temperature: float,
    eos_token_ids: list[int],
    pad_token_id: int | None,
    decoder_start_token_id: int | None = None,
    fast: bool = True,
    sharded: bool = False,
) -> Sampled:
    """Sample one continuation of each row, batched, with the KV cache.

    Args:
        model: a Hugging Face generation model, PEFT-wrapped or not.
        input_ids, attention_mask: (b, p) prompts, left-padded for a causal model.
        sampling: how to draw (at `sampling.temperature`, with top-k / top-p / min_new_tokens).
        temperature: the temperature of the recorded log-probs and entropy (the policy's).
        fast: the fast path (see the module docstring), else plain generate(do_sample=True).
        sharded: the model is FSDP2-sharded: no folding, and `synced_gpus` so that a process
            whose rows all ended keeps running forward passes until every process's have, and
            the all-gathers pair up.
    """
    common = dict(
        max_new_tokens=sampling.max_new_tokens,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_ids,
        decoder_start_token_id=decoder_start_token_id,
        use_cache=True,
        disable_compile=True,  # prompt lengths change every batch: compiling never pays
        return_dict_in_generate=True,
    )
    if not fast:
        knobs = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=GenerationConfig(
                do_sample=sampling.do_sample,
                min_new_tokens=sampling.min_new_tokens,
                output_logits=True,  # the raw logits of every step, before any warper
                **(knobs if sampling.do_sample else {}),
                **common,
            ),
            synced_gpus=sharded,
        )
        logits = torch.stack(out.logits, 1).float() / temperature  # (b, t, v)
        t = logits.shape[1]
        tokens = out.sequences[:, out.sequences.shape[1] - t :]
        return Sampled(
            out.sequences,
            ppo.logprobs_from_logits(logits, tokens),
            ppo.entropy_from_logits(logits),
        )

    sampler = StepSampler(sampling, temperature, eos_token_ids)
    config = GenerationConfig(
        do_sample=False,  # greedy over the sampler's one-hot scores = the sampler's draw
        # on CPU a preallocated cache instead of growing it by torch.cat every token; whether
        # that pays on a given machine: `benchmarks/cpu_choices.py --only cache` (README table)
        cache_implementation="static" if input_ids.device.type == "cpu" else None,
        **common,
    )
    with contextlib.nullcontext() if sharded else folded_lora(model):
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            logits_processor=LogitsProcessorList([sampler]),
            synced_gpus=sharded,
        )
    return Sampled(out.sequences, torch.cat(sampler.logprobs, 1), torch.cat(sampler.entropy, 1))
