"""The one sampling path of tether (PPO rollouts, evaluation, the CAI stages) and its CPU fast
path, behind one switch; plain Hugging Face sampling is the reference the fast path must agree
with (tests/test_fastpath.py: same log-probs for the same tokens, same sampling distribution,
and the lean loop's tokens are generate()'s for the same sampler and seed).

The fast path, each part measured against its plain alternative, side by side, by
`benchmarks/cpu_choices.py` (the `--only` name in brackets):

- `frozen_linear` / `use_onednn_linears` [linears]: every frozen fp32 linear layer (the blocks'
  and the lm_head) through oneDNN's linear on CPU, forward and the input's gradient. Installed
  on the model, so the reference pass and the update take it too, not only decoding.
- `decode` [loop]: the lean decode loop, a prefill and one token per row per step with a
  static KV cache [cache], in place of generate(); for a Llama model each step after the
  prefill is `LlamaStep`, the same layers without the module machinery, over key/value
  buffers of its own (the step beside its matmul floor: `benchmarks/ppo_step.py`).
- `StepSampler` [sampler]: draws each token by inverse CDF and records the chosen token's
  log-prob and the entropy, so no (b, t, v) logits are kept.
- `folded_lora` [fold]: each LoRA delta added into its base weight while decoding.

`RolloutWeights` (`--rollout-dtype`) samples with the frozen layers in bf16 or int8 instead;
the update then corrects for the mismatch (tether.trainer.rollout_correction).

The switch is `enabled`: on unless `fast_path=False` is given to `Policy` / `ChatModel`, or the
environment sets TETHER_FAST_PATH=0. Where it is on, each part still checks where it applies:
oneDNN for a frozen fp32 layer on CPU only, folding neither under FSDP2 (`sharded`), nor for
DoRA, nor while the adapter is disabled, nor with rollout weights.
Off, `sample` is `model.generate(do_sample=True, temperature, top_k, top_p, min_new_tokens)` with
`output_logits`, and the log-probs are taken from those logits afterwards: the same distribution
and the same log-probs, a different random stream (torch.multinomial), more time and memory.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from peft.tuners.lora import Linear as LoraLinear
from transformers import (
    Cache,
    DynamicCache,
    EncoderDecoderCache,
    GenerationConfig,
    LogitsProcessor,
    StaticCache,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.modeling_outputs import BaseModelOutput

from tether import distributed, ppo
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
# the frozen linear layers through oneDNN
# ----------------------------------------------------------------------------------------------

# oneDNN's fp32 linear, where this torch build has it (a private op: probed, never required).
_ONEDNN_LINEAR = (
    getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if torch.backends.mkldnn.is_available()
    else None
)


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _ONEDNN_LINEAR(x.contiguous(), weight, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    """y = x W^T + b through oneDNN; the backward gives x its gradient only (W and b are frozen),
    also through oneDNN: grad W = grad (W^T)^T, a linear with the transposed view of W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(weight)
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return _onednn(grad, weight.t(), None), None, None


def _onednn_takes(layer: torch.nn.Linear) -> bool:
    """Whether `frozen_linear` runs this layer through oneDNN (for an fp32 input on CPU): a
    frozen fp32 layer on CPU, where this torch build has oneDNN's linear."""
    weight, bias = layer.weight, layer.bias
    return (
        _ONEDNN_LINEAR is not None
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
    return _onednn(x, weight, bias)


def frozen_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The model's plain nn.Linear layers whose weight does not train: the base layers (under
    LoRA's wrappers too) and the lm_head, not LoRA's A and B."""
    return [m for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]


def use_onednn_linears(model: torch.nn.Module) -> None:
    """Run every plain nn.Linear of the model through `frozen_linear`: the base layers (under
    LoRA's wrappers too) and the lm_head; a layer that trains falls back to nn.Linear per call."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.forward = functools.partial(frozen_linear, module)


# ----------------------------------------------------------------------------------------------
# the frozen weights in cheaper numerics, for sampling only (--rollout-dtype)
# ----------------------------------------------------------------------------------------------


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: W ~ q * scale[:, None], |q| <= 127."""
    scale = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _bf16_linear(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x.to(torch.bfloat16), weight, bias).to(x.dtype)


def _int8_linear(
    q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor
) -> torch.Tensor:
    # torch's weight-only int8 kernel (what gpt-fast uses) takes 2-D bf16 activations on CPU
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    y = torch.ops.aten._weight_int8pack_mm(flat, q, scale).reshape(*x.shape[:-1], q.shape[0])
    y = y.to(x.dtype)
    return y if bias is None else y + bias


def _bf16_layer(weight: torch.Tensor, bias: torch.Tensor | None) -> Callable:
    bias = None if bias is None else bias.to(torch.bfloat16)
    return functools.partial(_bf16_linear, weight.to(torch.bfloat16), bias)


def _int8_layer(weight: torch.Tensor, bias: torch.Tensor | None) -> Callable:
    q, scale = quantize_int8(weight)
    return functools.partial(_int8_linear, q, scale.to(torch.bfloat16), bias)


# a frozen layer's (weight, bias) -> its forward in the rollout's numerics
ROLLOUT_LAYERS: dict[str, Callable] = {"bfloat16": _bf16_layer, "int8": _int8_layer}
ROLLOUT_DTYPES = ("float32", *ROLLOUT_LAYERS)


class RolloutWeights:
    """Every frozen fp32 linear layer of a model (the base layers under LoRA and the lm_head) in
    `dtype`, built once (the base never trains), swapped in by `installed()` while sampling.

    - bfloat16: weights and the layer's input in bf16, output back to fp32;
    - int8: weight-only int8 per output row (`quantize_int8`), activations in bf16 into torch's
      `_weight_int8pack_mm` (with fp32 activations that kernel is far slower on CPU).

    Everything else stays as training runs it: LoRA's A and B (they train: the delta stays
    exact, in fp32), norms, attention, the sampler. `float32` swaps nothing. The mismatch this
    leaves between rollout and training log-probs is measured and corrected in the update
    (tether.ppo.truncated_is_weights).

    Under FSDP2 every process holds the whole of these layers (gathered once, then converted:
    int8 is a quarter of the fp32 layers, bf16 a half), as a rollout engine holds its own copy;
    FSDP2 still gathers each block's fp32 shards for the block's forward (its hooks run around
    the whole block), so sharded sampling takes the rollout numerics without their speed.
    """

    def __init__(self, model: torch.nn.Module, dtype: str) -> None:
        if dtype not in ROLLOUT_DTYPES:
            raise TetherError(
                f"rollout dtype must be one of {', '.join(ROLLOUT_DTYPES)}, got {dtype!r}"
            )
        self.dtype = dtype
        self.forwards: dict[torch.nn.Module, Callable] = {}
        if dtype == "float32":
            return
        with torch.no_grad():
            for module in frozen_linears(model):
                if module.weight.dtype == torch.float32:
                    # FSDP2: each process gathers the whole layer (every process, in module order)
                    weight = distributed.full(module.weight.detach())
                    bias = None if module.bias is None else distributed.full(module.bias.detach())
                    self.forwards[module] = ROLLOUT_LAYERS[dtype](weight, bias)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        saved = {m: m.__dict__.get("forward") for m in self.forwards}
        for module, forward in self.forwards.items():
            module.forward = forward
        try:
            yield
        finally:
            for module, forward in saved.items():
                if forward is None:
                    del module.forward
                else:
                    module.forward = forward


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
    """Draws each next token (`draw`, what the lean loop calls); as generate()'s last logits
    processor it hands generate() a one-hot score, so generate() running greedy draws the same
    tokens (the tests' oracle for the lean loop).

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
        logprobs = torch.ops.aten.log_softmax.int_out(logits, -1, out=self._buffer("lp", logits))
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
# one decoding step of a Llama model, without the module machinery
# ----------------------------------------------------------------------------------------------


def _cheapest_call(module: torch.nn.Module) -> Callable:
    """What computes `module(x)` with the least machinery: a LoRA wrapper whose adapter is off
    (folded into the base weights, or the reference) is its base layer, and a plain nn.Linear
    without hooks is its forward (the oneDNN or rollout-dtype one installed on it)."""
    if isinstance(module, LoraLinear):
        if not (module.disable_adapters and not module.merged):
            return module
        module = module.get_base_layer()
    hooked = module._forward_hooks or module._forward_pre_hooks
    return module.forward if type(module) is torch.nn.Linear and not hooked else module


def _rms_norm(norm: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm's forward on fp32 `h`: its own ops without its dtype casts (bit for bit:
    tests/test_fastpath.py). torch's rms_norm is the same ops behind a composite that adds
    casts and allocations of its own: in an in-process A/B on SmolLM2's decoding it was the
    slower of the two."""
    return norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


def matmul_groups(model: torch.nn.Module) -> list[list[torch.nn.Linear]]:
    """The model's frozen linear layers (`frozen_linears`, in order), grouped as a decoding
    step runs them: a Llama layer's q/k/v together (`one_matmul`), every other layer alone.
    For the matmul floor of `benchmarks/ppo_step.py`."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    together: dict[torch.nn.Module, list[torch.nn.Linear]] = {}
    if LlamaStep.applies(core, sharded=False):
        for layer in core.model.layers:
            a = layer.self_attn
            linears = [getattr(m, "base_layer", m) for m in (a.q_proj, a.k_proj, a.v_proj)]
            together.update((m, linears) for m in linears)
    groups: list[list[torch.nn.Linear]] = []
    for m in frozen_linears(model):
        group = together.get(m, [m])
        if group[0] is m:
            groups.append(group)
    return groups


def _frozen_layer(call: Callable) -> torch.nn.Linear | None:
    """The layer of a `_cheapest_call` that is a plain frozen layer's oneDNN forward
    (`use_onednn_linears`), else None."""
    if isinstance(call, functools.partial) and call.func is frozen_linear:
        return call.args[0] if _onednn_takes(call.args[0]) else None
    return None


def one_matmul(modules: tuple[torch.nn.Module, ...]) -> Callable:
    """x -> the modules' outputs side by side, (b, sum of their out_features): where each is a
    plain frozen layer without bias (LoRA folded in, or off), one oneDNN matmul over their
    weights stacked now, a copy held while it lives (a decoding step holds it for a rollout:
    70 MB for SmolLM2's q/k/v, freed after); the same outputs bit for bit
    (tests/test_fastpath.py). On SmolLM2's decoding shapes (16 rows) 30 layers' q/k/v take
    ~8 ms as one matmul against ~10.6 ms as three; gate/up stacked saved 1-3 ms of ~25 for a
    210 MB copy each rollout (~70 ms): not done. Else each called as `_cheapest_call` gives it
    (the bf16/int8 rollout layers, LoRA beside them), concatenated.

    Why a copy a rollout, not the weights stored stacked for good: the loaded weights are pages
    of the checkpoint file mapped in memory, and a stacked copy made once leaves those pages
    resident beside it (+265 MB peak RSS with gate/up too, measured)."""
    calls = [_cheapest_call(m) for m in modules]
    layers = [_frozen_layer(c) for c in calls]
    if all(m is not None and m.bias is None for m in layers):
        stacked = torch.cat([m.weight for m in layers])
        return functools.partial(_onednn, weight=stacked, bias=None)
    return lambda x: torch.cat([call(x) for call in calls], -1)


def _plus(module: torch.nn.Module) -> Callable:
    """(x, h) -> h + module(x): for a plain frozen layer, the add runs inside oneDNN's matmul (a
    binary post-op: the same sum bit for bit, one op fewer), else as an op of its own."""
    call = _cheapest_call(module)
    layer = _frozen_layer(call)
    if layer is None:
        return lambda x, h: h + call(x)
    return functools.partial(_onednn_plus, weight=layer.weight, bias=layer.bias)


def _onednn_plus(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    return _ONEDNN_LINEAR.binary(x.contiguous(), h, weight, bias, "add")


class LlamaStep:
    """One token per row through a Llama model (SmolLM2's architecture), for the decode loop.

    Why: at 16 rows a decoding step of the Hugging Face forward is ~6,000 small ops for 211
    matmuls, and their dispatch, the module calls (PEFT's wrappers, decorators, the mask built
    anew each step) and attention over the static cache cost about 60% on top of the matmuls
    (`benchmarks/ppo_step.py` prints the step beside that floor). This is the same computation
    with the same layers: each projection is called as `_cheapest_call` gives it (the folded
    base layer's oneDNN forward; the LoRA wrapper where the adapter runs beside rollout-dtype
    layers), q/k/v as one matmul over their weights stacked for the rollout
    (`one_matmul`), the residual adds inside o_proj's and down_proj's matmuls (`_plus`),
    norms and rotary as Llama computes them (rotary on the queries and keys at once), and
    attention written out for one query per row with grouped key/value heads: the same
    numbers, op for op, in fewer ops. The lm_head is called as a module, so
    the value head's hook sees its input. tests/test_fastpath.py checks the sampled tokens,
    log-probs and values against the loop through the model's own forward.

    It holds the keys and values itself, taken over from the prefill's cache: the keys
    transposed, (b * kv_heads, head_dim, length), so that a query's scores are a plain matmul
    against them (against keys laid out as the cache lays them out, the transposed operand
    costs ~1.5x as much: memory-bound, ~1 MB a layer and step); never-written positions are
    never read, so the buffers are not zero-filled.

    Applies to an unsharded fp32 `LlamaForCausalLM` only (FSDP2 gathers weights in module
    hooks); every other model decodes through its own forward.
    """

    def __init__(self, core: torch.nn.Module, prefilled: Cache, length: int) -> None:
        model = core.model
        self.rotary = model.rotary_emb
        self.embed, self.head = model.embed_tokens, core.lm_head
        self.norm = model.norm
        attention = model.layers[0].self_attn
        self.heads = core.config.num_attention_heads
        self.kv_heads = core.config.num_key_value_heads
        self.head_dim, self.scaling = attention.head_dim, attention.scaling
        self.layers = []
        for layer, cached in zip(model.layers, prefilled.layers, strict=True):
            a, mlp = layer.self_attn, layer.mlp
            qkv = one_matmul((a.q_proj, a.k_proj, a.v_proj))
            b, h, p, d = cached.keys.shape
            keys = cached.keys.new_empty(b * h, d, length)
            keys[:, :, :p] = cached.keys.reshape(b * h, p, d).transpose(1, 2)
            values = cached.values.new_empty(b * h, length, d)
            values[:, :p] = cached.values.reshape(b * h, p, d)
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            gate, up = _cheapest_call(mlp.gate_proj), _cheapest_call(mlp.up_proj)
            calls = (qkv, _plus(a.o_proj), gate, up, _plus(mlp.down_proj), mlp.act_fn)
            self.layers.append((*norms, *calls, keys, values))

    @staticmethod
    def applies(core: torch.nn.Module, sharded: bool) -> bool:
        from transformers.models.llama import modeling_llama as llama

        if sharded or type(core) is not llama.LlamaForCausalLM:
            return False
        if core.model.embed_tokens.weight.dtype != torch.float32:
            return False  # Llama's norms compute in fp32 inside a bf16/fp16 model; these do not
        return all(
            type(layer) is llama.LlamaDecoderLayer
            and type(layer.self_attn) is llama.LlamaAttention
            and type(layer.mlp) is llama.LlamaMLP
            and type(layer.input_layernorm) is llama.LlamaRMSNorm
            and type(layer.post_attention_layernorm) is llama.LlamaRMSNorm
            for layer in core.model.layers
        )

    def __call__(
        self, ids: torch.Tensor, positions: torch.Tensor, at: int, padding: torch.Tensor
    ) -> torch.Tensor:
        """Logits (b, v) for one token per row: `ids` and `positions` (b, 1), written at
        position `at`; `padding` (b, 1, 1, L) is 0 at each row's real positions and -inf at its
        left padding. Only positions up to `at` are read: that is the causal mask."""
        b, n = ids.shape[0], at + 1
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        rows, half = b * kv_heads, dim // 2
        # one mask for every layer and kv head: (b * kv_heads, 1, n)
        bias = padding[..., :n].expand(b, kv_heads, 1, n).reshape(rows, 1, n)
        h = self.embed(ids[:, 0])  # (b, d): one position per row, so no sequence axis
        cos, sin = self.rotary(h, positions)  # (b, 1, dim)
        # Llama's q * cos + rotate_half(q) * sin with rotate_half(q) = (-q2, q1), as
        # flip(q1, q2) * (-sin1, sin2): the same products, bit for bit, in one op instead of four
        cos = cos.view(b, 1, 2, half)
        sin = torch.cat([-sin[..., :half], sin[..., half:]], -1).view(b, 1, 2, half)
        qk_width = (heads + kv_heads) * dim
        for n1, n2, qkv, o_proj_plus, gate, up, down_plus, act, keys, values in self.layers:
            y = qkv(_rms_norm(n1, h))  # (b, (heads + 2 kv_heads) * dim): q, k, v side by side
            qk = y[:, :qk_width].view(b, heads + kv_heads, 2, half)
            qk = qk * cos + qk.flip(-2) * sin  # rotary on the queries and keys at once
            keys[:, :, at].view(b, kv_heads, dim).copy_(qk[:, heads:].view(b, kv_heads, dim))
            values[:, at].view(b, kv_heads, dim).copy_(y[:, qk_width:].view(b, kv_heads, dim))
            # query head j reads key/value head j // groups (Llama's repeat_kv), so each
            # (row, kv head) is one small batched matmul over the positions written so far
            q = qk[:, :heads].reshape(rows, heads // kv_heads, dim)
            weights = torch.baddbmm(bias, q, keys[:, :, :n], alpha=self.scaling).softmax(-1)
            h = o_proj_plus(torch.bmm(weights, values[:, :n]).view(b, heads * dim), h)
            x = _rms_norm(n2, h)
            h = down_plus(act(gate(x)) * up(x), h)
        # (b, 1, d) into the lm_head: its hook keeps the last position for the value head
        return self.head(_rms_norm(self.norm, h).unsqueeze(1))[:, -1]


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
    weights: RolloutWeights | None = None,
) -> Sampled:
    """Sample one continuation of each row, batched, with the KV cache.

    Args:
        model: a Hugging Face generation model, PEFT-wrapped or not.
        input_ids, attention_mask: (b, p) prompts, left-padded for a causal model.
        sampling: how to draw (at `sampling.temperature`, with top-k / top-p / min_new_tokens).
        temperature: the temperature of the recorded log-probs and entropy (the policy's).
        fast: the lean decode loop (`decode`), else plain generate(do_sample=True).
        sharded: the model is FSDP2-sharded: no folding, and every process runs as many forward
            passes as the longest one needs, so that the all-gathers pair up.
        weights: the frozen layers in other numerics to sample with (`RolloutWeights`; fast
            path only); LoRA is then not folded, its delta runs beside them in fp32.
    """
    if fast:
        cheaper = weights is not None and weights.forwards
        if cheaper:
            context = weights.installed()
        else:
            context = contextlib.nullcontext() if sharded else folded_lora(model)
        with context:
            return decode(
                model,
                input_ids,
                attention_mask,
                StepSampler(sampling, temperature, eos_token_ids),
                sampling.max_new_tokens,
                eos_token_ids,
                pad_token_id,
                decoder_start_token_id,
                sharded,
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
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_ids,
            decoder_start_token_id=decoder_start_token_id,
            use_cache=True,
            disable_compile=True,  # prompt lengths change every batch: compiling never pays
            return_dict_in_generate=True,
        ),
        synced_gpus=sharded,
    )
    logits = torch.stack(out.logits, 1).float() / temperature  # (b, t, v)
    t = logits.shape[1]
    tokens = out.sequences[:, out.sequences.shape[1] - t :]
    return Sampled(
        out.sequences, ppo.logprobs_from_logits(logits, tokens), ppo.entropy_from_logits(logits)
    )


def decode(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sampler: StepSampler,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int | None,
    decoder_start_token_id: int | None = None,
    sharded: bool = False,
) -> Sampled:
    """The lean decode loop: a prefill, then one forward of one token per row per step with a
    static KV cache (for Llama, `LlamaStep`'s own, filled from the prefill's), the sampler's
    draw, and nothing else; it stops when every row has drawn an EOS (under `sharded`, every
    row of every process) or after `max_new_tokens`.

    It does what generate() does with greedy decoding over the sampler's scores, the same
    forward passes and the same tokens (tests/test_fastpath.py compares the two), without
    generate()'s per-step machinery: input preparation, logits processors and stopping
    criteria, the copies of the growing attention mask and sequences. Rows that ended get
    `pad_token_id` (the first EOS where there is none), as generate() writes them.
    """
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    # FSDP2 hooks the outermost module (it gathers the root's weights: embeddings, lm_head), so
    # a sharded model is called as it is; else PEFT's wrapper is skipped (its LoRA layers live
    # in the base model)
    run = model if sharded else core
    config = core.config
    b, p = input_ids.shape
    pad = pad_token_id if pad_token_id is not None else eos_token_ids[0]
    eos = torch.tensor(eos_token_ids, device=input_ids.device)
    takes = inspect.signature(core.forward).parameters
    cache_arg = "cache" if "cache" in takes else "past_key_values"
    decoder_config = config.get_text_config(decoder=True)
    if config.is_encoder_decoder:
        start = decoder_start_token_id
        if start is None:
            start = config.decoder_start_token_id
        encoded = None  # the encoder runs in the first step's forward
        cache = EncoderDecoderCache(
            StaticCache(config=decoder_config, max_cache_len=max_new_tokens),
            StaticCache(config=decoder_config, max_cache_len=p),
        )
        sequences = torch.full(
            (b, 1 + max_new_tokens), pad, dtype=torch.long, device=input_ids.device
        )
        sequences[:, 0] = start
        first = 1

        def forward(t: int) -> torch.Tensor:
            nonlocal encoded
            source = {"input_ids": input_ids} if encoded is None else {"encoder_outputs": encoded}
            out = run(
                **source,
                attention_mask=attention_mask,
                decoder_input_ids=sequences[:, first + t - 1 : first + t],
                use_cache=True,
                **{cache_arg: cache},
            )
            if encoded is None:
                encoded = BaseModelOutput(last_hidden_state=out.encoder_last_hidden_state)
            return out.logits[:, -1]

    else:
        lean = LlamaStep.applies(core, sharded)
        # LlamaStep takes the keys and values over from a prefill that attends over the prompt
        # alone; the model's own forward decodes with a static cache of the whole length
        length = p + max_new_tokens
        cache = DynamicCache() if lean else StaticCache(config=decoder_config, max_cache_len=length)
        sequences = torch.cat(
            [
                input_ids,
                torch.full(
                    (b, max_new_tokens), pad, dtype=input_ids.dtype, device=input_ids.device
                ),
            ],
            1,
        )
        # the response's positions are real tokens: the mask grows by ones
        mask = torch.cat([attention_mask, torch.ones_like(sequences[:, p:])], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = {"logits_to_keep": 1} if "logits_to_keep" in takes else {}
        first = p
        step = None  # the LlamaStep, built from the prefill's cache
        if lean:
            padding = torch.zeros(b, 1, 1, length, device=mask.device)
            padding.masked_fill_(mask[:, None, None, :] == 0, float("-inf"))

        def forward(t: int) -> torch.Tensor:
            nonlocal step, cache
            # step 0 is the prefill of the prompt, step t > 0 feeds the token drawn at t - 1
            lo = 0 if t == 0 else p + t - 1
            if t > 0 and lean:
                if step is None:
                    step, cache = LlamaStep(core, cache, length), None  # it holds the cache now
                return step(sequences[:, lo : lo + 1], positions[:, lo : lo + 1], lo, padding)
            return run(
                input_ids=sequences[:, lo : p + t],
                attention_mask=mask[:, : p + t],
                position_ids=positions[:, lo : p + t],
                use_cache=True,
                **{cache_arg: cache},
                **keep,
            ).logits[:, -1]

    unfinished = torch.ones(b, dtype=torch.bool, device=input_ids.device)
    n = 0
    for t in range(max_new_tokens):
        token = sampler.draw(None, forward(t)).squeeze(1)
        sequences[:, first + t] = torch.where(unfinished, token, pad)
        unfinished &= ~torch.isin(token, eos)
        n = t + 1
        going = bool(unfinished.any())
        if sharded:
            going = not distributed.everywhere(not going)
        if not going:
            break
    return Sampled(
        sequences[:, : first + n], torch.cat(sampler.logprobs, 1), torch.cat(sampler.entropy, 1)
    )
