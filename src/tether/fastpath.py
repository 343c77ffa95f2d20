"""The one sampling path of tether (PPO rollouts, evaluation, the CAI stages) and its CPU fast
path, behind one switch; plain Hugging Face sampling is the reference the fast path must agree
with (tests/test_fastpath.py: same log-probs for the same tokens, same sampling distribution).

The fast path keeps what a benchmark shows paying on a configuration users run (the `--only`
name of `benchmarks/cpu_choices.py` in brackets):

- `frozen_linear` / `use_onednn_linears` [linears]: every frozen fp32 linear layer (the blocks'
  and the lm_head) through oneDNN's linear on CPU, forward and the input's gradient. Installed
  on the model, so the reference pass and the update take it too, not only decoding.
- `StepSampler` [sampler]: draws each token by inverse CDF inside generate() and records the
  chosen token's log-prob and the entropy, so no (b, t, v) logits are kept.
- for an fp32 Llama model on one process, `tether.llama_step`: each decoding step without the
  module machinery (behind its own version check, with the model's forward as its fallback).

The switch is `enabled`: on unless `fast_path=False` is given to `Policy` / `ChatModel`, or the
environment sets TETHER_FAST_PATH=0. Off, `sample` is `model.generate(do_sample=True,
temperature, top_k, top_p, min_new_tokens)` with `output_logits`, and the log-probs are taken
from those logits afterwards: the same distribution and the same log-probs, a different random
stream (torch.multinomial), more time and memory.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tether import llama_step, ppo, torch_ops
from tether.errors import env_switch
from tether.rollout import SamplingParams

ENV_VAR = "TETHER_FAST_PATH"
# off by default: decode with a static KV cache, which transformers' generate() compiles on a
# GPU (torch.compile, mode "reduce-overhead": CUDA graphs); see `static_decoding`
STATIC_ENV_VAR = "TETHER_STATIC_DECODE"
# prompts are padded to a multiple of this many tokens under static decoding, so that a few
# cache shapes, not one per prompt length, are compiled
STATIC_BUCKET = 64


def enabled(requested: bool | None = None) -> bool:
    """Whether to take the fast path: `requested` where a caller gives it (the `fast_path`
    argument of Policy and ChatModel), else on unless $TETHER_FAST_PATH says 0."""
    return env_switch(ENV_VAR, on="the fast path, the default") if requested is None else requested


def static_decoding(requested: bool | None = None) -> bool:
    """Whether to decode with a static KV cache (`requested` where a caller gives it, else off
    unless $TETHER_STATIC_DECODE says 1). Experimental, off by default.

    Why it exists: on a GPU a decoding step of a small model is bound by kernel launches, not
    by reading the weights, unless the step is captured; with a static cache (and
    `disable_compile` off) transformers' generate() compiles the model's forward with
    torch.compile's "reduce-overhead" mode (CUDA graphs). On the CPU nothing is compiled and the
    static cache only changes where the keys live: tests/test_gpu.py checks that it samples the
    same tokens and log-probs there. Whether it pays on a GPU is what `benchmarks/gpu_step.py
    --decode eager,static` measures; no GPU figure has been taken yet."""
    if requested is not None:
        return requested
    return env_switch(STATIC_ENV_VAR, on="static-cache decoding", default=False)


def _bucketed(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int, left: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(b, p) prompts padded to a multiple of `STATIC_BUCKET` columns (on the left for a causal
    model, masked out), and how many columns were added."""
    extra = -input_ids.shape[1] % STATIC_BUCKET
    if extra == 0:
        return input_ids, attention_mask, 0
    side = (extra, 0) if left else (0, extra)
    ids = torch.nn.functional.pad(input_ids, side, value=pad_token_id)
    return ids, torch.nn.functional.pad(attention_mask, side, value=0), extra


# ----------------------------------------------------------------------------------------------
# the frozen linear layers through oneDNN
# ----------------------------------------------------------------------------------------------


class _OneDnnLinear(torch.autograd.Function):
    """y = x W^T + b through oneDNN; the backward gives x its gradient only (W and b are frozen),
    also through oneDNN: grad W = grad (W^T)^T, a linear with the transposed view of W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(weight)
        return torch_ops.onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return torch_ops.onednn_linear(grad, weight.t(), None), None, None


def _onednn_takes(layer: torch.nn.Linear) -> bool:
    """Whether `frozen_linear` runs this layer through oneDNN (for an fp32 input on CPU): a
    frozen fp32 layer on CPU, where this torch build has oneDNN's linear."""
    weight, bias = layer.weight, layer.bias
    return (
        torch_ops.has_onednn_linear()
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and not weight.requires_grad
        and not (bias is not None and bias.requires_grad)
    )


def frozen_linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A linear layer's forward: oneDNN's linear for a frozen fp32 layer on CPU, else nn.Linear's.

    Why: on CPU, torch's fp32 matmul (MKL) is slow for the shapes of a small model: the layers
    of SmolLM2 at a decoding step (16 rows), an update micro-batch (~190 rows) or a prefill
    (~750 rows) and the vocabulary-wide lm_head, forward and backward alike, while oneDNN's
    linear gives the same result to float rounding. `benchmarks/cpu_choices.py --only linears`
    measures both kernels at those row counts. The LoRA matrices and the value head train, so
    they keep nn.Linear's path (their weights need gradients).
    """
    weight, bias = layer.weight, layer.bias
    if not _onednn_takes(layer) or x.device.type != "cpu" or x.dtype != torch.float32:
        return torch.nn.functional.linear(x, weight, bias)
    if x.requires_grad:
        return _OneDnnLinear.apply(x, weight, bias)
    return torch_ops.onednn_linear(x, weight, bias)


def frozen_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The model's plain nn.Linear layers whose weight does not train: the base layers (under
    LoRA's wrappers too) and the lm_head, not LoRA's A and B."""
    return [m for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]


def onednn_applies(model: torch.nn.Module) -> bool:
    """Whether `use_onednn_linears` installs anything on `model`: where this torch build has
    oneDNN's linear and the model's weights are on the CPU. On a GPU every linear stays
    nn.Linear's own (cuBLAS), with no Python wrapper around each call."""
    weight = next(model.parameters(), None)
    return torch_ops.has_onednn_linear() and weight is not None and weight.device.type == "cpu"


def use_onednn_linears(model: torch.nn.Module) -> None:
    """Run every plain nn.Linear of the model through `frozen_linear`: the base layers (under
    LoRA's wrappers too) and the lm_head; a layer that trains falls back to nn.Linear per call.
    Nothing is installed where `onednn_applies` says no (a model on a GPU)."""
    if not onednn_applies(model):
        return
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.forward = functools.partial(frozen_linear, module)


# ----------------------------------------------------------------------------------------------
# the sampler
# ----------------------------------------------------------------------------------------------

CDF_BLOCK = 256


def inverse_cdf(
    weights: torch.Tensor, uniform: torch.Tensor, wide: torch.Tensor | None = None
) -> torch.Tensor:
    """(b, 1) for each row of (b, v) non-negative `weights`, the token whose interval of the
    running sum holds `uniform` (b, 1) in [0, 1) times the row's total: a draw from the weights
    normalised (they need not sum to 1: a ban zeroes some). A token of weight 0 owns an empty
    interval and is never drawn.

    In two levels: the running sum of the blocks' sums (`CDF_BLOCK` tokens each) picks the
    block, the running sum inside that one block picks the token. Sums in float64 (49k fp32
    probabilities summed in fp32 drift by ~1e-4 at the tail). One running sum over the whole
    row in float64 draws the same tokens (tests/test_fastpath.py) but converts and scans all
    of it into a fresh (b, v) float64 tensor: 0.8 ms a step in a profile of SmolLM2's decoding
    (16 x 49k); this, 0.2 ms with the logits in cache, 0.5 ms without.

    `wide`: a float64 scratch tensor of the blocks' shape, (b, blocks, `CDF_BLOCK`), for the
    weights converted (the same sums bit for bit as converting into a fresh tensor, which at
    16 x 49k costs a page fault per 4 KB: `StepSampler` keeps one per rollout)."""
    b, v = weights.shape
    pad = -v % CDF_BLOCK
    if pad:
        weights = torch.nn.functional.pad(weights, (0, pad))
    blocks = weights.view(b, -1, CDF_BLOCK)
    if wide is None:
        wide = blocks.to(torch.float64)
    else:
        wide.copy_(blocks)
    ends = wide.sum(-1).cumsum(-1)  # (b, blocks): where each block ends
    u = uniform * ends[:, -1:]
    # right=True: the first block that ends beyond u (an empty block ends where it starts)
    block = torch.searchsorted(ends, u, right=True).clamp_(max=ends.shape[1] - 1)
    start = torch.where(block > 0, ends.gather(-1, (block - 1).clamp(min=0)), 0.0)
    inside = blocks.gather(1, block[..., None].expand(b, 1, CDF_BLOCK)).squeeze(1)
    token = torch.searchsorted(inside.cumsum(-1, dtype=torch.float64), u - start, right=True)
    # u - start can round to the block's own sum, past its last interval: the block's last
    # token of positive weight is then the one drawn
    last = CDF_BLOCK - 1 - (inside > 0).flip(-1).int().argmax(-1, keepdim=True)
    # non-finite weights (a poisoned model; the guard stops the run) still give a real token
    return (block * CDF_BLOCK + torch.minimum(token, last)).clamp_(max=v - 1)


class StepSampler(LogitsProcessor):
    """Draws each next token (`draw`): as generate()'s last logits processor it hands generate()
    a one-hot score, so generate() running greedy takes the drawn token; the Llama decoding
    step's loop (tether.llama_step) calls `draw` itself.

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
        self.buffers: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str, like: torch.Tensor, dtype: torch.dtype | None = None, shape=None):
        """A (b, v) scratch tensor (or of `shape`) for this sampler's steps, allocated once: at
        16 x 49k a fresh one each step can cost more than the op that fills it (glibc hands
        buffers this large back to the OS and maps them anew, a page fault per 4 KB). Measured
        in SmolLM2's decoding, 16 rows, 9 rollouts each: 2.1-8.8 ms a draw with fresh tensors,
        1.6-2.2 ms with these."""
        dtype = dtype or like.dtype
        shape = torch.Size(shape or like.shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
            buffer = self.buffers[name] = like.new_empty(shape, dtype=dtype)
        return buffer

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        token = self.draw(input_ids, scores)
        return torch.full_like(scores, -math.inf).scatter_(-1, token, 0.0)

    def draw(self, input_ids: torch.LongTensor | None, scores: torch.Tensor) -> torch.Tensor:
        """(b, 1) the next token of each row, from (b, v) raw logits; records its log-prob and
        the entropy.

        The policy's distribution is taken once (log-softmax, exp) and serves the log-prob, the
        entropy (a row-wise dot product: linalg.vecdot's product and sum, bit for bit, the
        product into a buffer of the sampler's instead of a fresh (b, v) tensor each step, which
        vecdot allocates) and the draw (the EOS ban
        zeroes it in place): at 16 x 49k each (b, v) pass costs about as much as a layer's
        matmul (`benchmarks/cpu_choices.py --only sampler`)."""
        logits = scores.float()
        if self.temperature != 1.0:
            logits = torch.div(logits, self.temperature, out=self._buffer("logits", logits))
        logprobs = torch_ops.log_softmax_into(logits, self._buffer("lp", logits))
        probs = torch.exp(logprobs, out=self._buffer("probs", logits))
        product = torch.mul(probs, logprobs, out=self._buffer("product", logits))
        self.entropy.append(-product.sum(-1, keepdim=True))
        banned = len(self.logprobs) < self.sampling.min_new_tokens
        if not self.sampling.do_sample:
            token = self._warped(input_ids, scores, banned).argmax(-1, keepdim=True)
        else:
            if self.warpers or self.sampling.temperature != self.temperature:
                weights = torch.softmax(self._warped(input_ids, scores, banned), -1)
            else:
                weights = probs  # the policy's own distribution: no second softmax
                if banned:
                    weights[:, self.eos_ids] = 0.0
            uniform = torch.rand(weights.shape[0], 1, dtype=torch.float64, device=weights.device)
            b, v = weights.shape
            blocks = (b, -(-v // CDF_BLOCK), CDF_BLOCK)
            wide = self._buffer("wide", weights, torch.float64, blocks)
            token = inverse_cdf(weights, uniform, wide)
        self.logprobs.append(logprobs.gather(-1, token))
        return token

    def _warped(
        self, input_ids: torch.LongTensor | None, scores: torch.Tensor, banned: bool
    ) -> torch.Tensor:
        """The logits to draw from at the sampling temperature: EOS banned before
        min_new_tokens, then top-k / top-p."""
        logits = scores.float() / self.sampling.temperature
        if banned:
            logits[:, self.eos_ids] = -math.inf
        for warp in self.warpers:
            logits = warp(input_ids, logits)
        return logits


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
    static: bool | None = None,
    compile_ok: bool = True,
) -> Sampled:
    """Sample one continuation of each row, batched, with the KV cache.

    Args:
        model: a Hugging Face generation model, PEFT-wrapped or not.
        input_ids, attention_mask: (b, p) prompts, left-padded for a causal model.
        sampling: how to draw (at `sampling.temperature`, with top-k / top-p / min_new_tokens).
        temperature: the temperature of the recorded log-probs and entropy (the policy's).
        fast: draw with `StepSampler` (for an fp32 Llama model through tether.llama_step's
            decoding step), else plain generate(do_sample=True).
        sharded: the model is FSDP2-sharded: every process runs as many forward passes as the
            longest one needs, so that the all-gathers pair up (generate's synced_gpus).
        static: decode inside generate() with a static KV cache, prompts padded to a multiple
            of `STATIC_BUCKET` (None: `static_decoding()`, off by default; never when sharded,
            and the CPU Llama step keeps its own cache).
        compile_ok: under static decoding, let transformers compile the forward on a GPU
            (CUDA graphs); a caller whose forward hooks keep tensors across steps says False,
            since a captured graph reuses its output buffers at every replay.
    """
    config = dict(
        max_new_tokens=sampling.max_new_tokens,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_ids,
        decoder_start_token_id=decoder_start_token_id,
        use_cache=True,
        disable_compile=True,  # prompt lengths change every batch: compiling never pays
        return_dict_in_generate=True,
    )
    cut = 0
    if static_decoding(static) and not sharded and not (fast and llama_step.applies(model, False)):
        causal = not getattr(model.config, "is_encoder_decoder", False)
        pad = pad_token_id if pad_token_id is not None else eos_token_ids[0]
        input_ids, attention_mask, extra = _bucketed(input_ids, attention_mask, pad, causal)
        cut = extra if causal else 0  # the added columns come off the returned sequences
        config.update(cache_implementation="static", disable_compile=not compile_ok)
    if fast:
        sampler = StepSampler(sampling, temperature, eos_token_ids)
        if llama_step.applies(model, sharded):
            sequences = llama_step.decode(
                model,
                input_ids,
                attention_mask,
                sampler,
                sampling.max_new_tokens,
                eos_token_ids,
                pad_token_id,
            )
        else:
            # greedy over the sampler's one-hot scores: generate() takes the token it drew
            sequences = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=GenerationConfig(do_sample=False, **config),
                logits_processor=LogitsProcessorList([sampler]),
                synced_gpus=sharded,
            ).sequences
        return Sampled(
            sequences[:, cut:], torch.cat(sampler.logprobs, 1), torch.cat(sampler.entropy, 1)
        )
    knobs = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=GenerationConfig(
            do_sample=sampling.do_sample,
            min_new_tokens=sampling.min_new_tokens,
            output_logits=True,  # the raw logits of every step, before any warper
            **(knobs if sampling.do_sample else {}),
            **config,
        ),
        synced_gpus=sharded,
    )
    logits = torch.stack(out.logits, 1).float() / temperature  # (b, t, v)
    t = logits.shape[1]
    tokens = out.sequences[:, out.sequences.shape[1] - t :]
    return Sampled(
        out.sequences[:, cut:],
        ppo.logprobs_from_logits(logits, tokens),
        ppo.entropy_from_logits(logits),
    )
