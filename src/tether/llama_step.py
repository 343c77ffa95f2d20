"""The one place tether depends on transformers' internals: a decoding step of a Llama model
(SmolLM2, the embedded default) without the module machinery, for fp32 sampling on CPU.

Why it is kept: at 16 rows a decoding step through the Hugging Face forward is ~6,000 small ops
around 211 matmuls, and their dispatch, the module calls and attention over the cache cost as
much again on top of the matmuls; this step computes the same layers in a few hundred ops.
`benchmarks/compare_trl.py --llama-step both` measures a whole PPO and GRPO step with it and
without it, side by side (docs: the performance page).

What it reads of transformers 5 (so a transformers release outside `TESTED` decodes through
the model's own forward instead): the classes of `transformers.models.llama.modeling_llama`,
a `DynamicCache`'s per-layer `keys`/`values` after the prefill, the model's `rotary_emb` and
rotate_half's layout, `attention.scaling` and `head_dim`, `LlamaRMSNorm.variance_epsilon`.
PEFT's LoRA layers are folded into their base weights while it runs (`folded_lora`).

Off with TETHER_LLAMA_STEP=0 (or TETHER_FAST_PATH=0): every model then decodes through its own
forward inside generate(). tests/test_fastpath.py checks that both give the same tokens,
log-probs, entropy and values.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
import transformers
from peft.tuners.lora import Linear as LoraLinear
from transformers import DynamicCache

from tether.errors import env_switch

ENV_VAR = "TETHER_LLAMA_STEP"
# transformers releases (major, minor) this step has been tested against, first and last:
# bump the last once tests/test_fastpath.py passes on a newer one
TESTED = ((5, 23), (5, 25))


def tested(version: str = transformers.__version__) -> bool:
    """Whether `version` of transformers is one this step has been tested against."""
    major, minor = (int(part) for part in version.split(".")[:2])
    return TESTED[0] <= (major, minor) <= TESTED[1]


def enabled() -> bool:
    """On unless $TETHER_LLAMA_STEP says 0."""
    return env_switch(ENV_VAR)


def applies(model: torch.nn.Module, sharded: bool) -> bool:
    """Whether `model` (PEFT-wrapped or not) decodes through `LlamaStep`: an fp32
    `LlamaForCausalLM` made of Llama's own layers, on the CPU (the step is written for CPU
    dispatch costs; on a GPU the model's own forward runs, SDPA and all), in one process (FSDP2
    gathers weights in module hooks), on a tested transformers release, with the step on."""
    if sharded or not enabled() or not tested():
        return False
    from transformers.models.llama import modeling_llama as llama

    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    if type(core) is not llama.LlamaForCausalLM:
        return False
    weight = core.model.embed_tokens.weight
    if weight.device.type != "cpu":
        return False
    if weight.dtype != torch.float32:
        return False  # Llama's norms compute in fp32 inside a bf16/fp16 model; these do not
    return all(
        type(layer) is llama.LlamaDecoderLayer
        and type(layer.self_attn) is llama.LlamaAttention
        and type(layer.mlp) is llama.LlamaMLP
        and type(layer.input_layernorm) is llama.LlamaRMSNorm
        and type(layer.post_attention_layernorm) is llama.LlamaRMSNorm
        for layer in core.model.layers
    )


@contextlib.contextmanager
def folded_lora(model: torch.nn.Module) -> Iterator[None]:
    """For sampling only: add each LoRA delta (B A * scale) of a PEFT `model` into its base
    weight and run the plain layers, then put the saved base weights back bit for bit.

    Why: the step then calls each projection as one plain layer (`_plain`), not PEFT's wrapper
    with two small matmuls beside it, while the adapter stands still; folding costs one copy of
    the adapted weights. Restoring from the copy (not subtracting) keeps the reference exact
    forever. Does nothing for a model without LoRA layers, for DoRA (its delta is not B A) and
    while the adapter is disabled (the reference).
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


def _plain(module: torch.nn.Module) -> torch.nn.Module:
    """A LoRA wrapper whose adapter is off (folded into the base weights, or the reference) is
    its base layer; anything else is itself."""
    if isinstance(module, LoraLinear) and module.disable_adapters and not module.merged:
        return module.get_base_layer()
    return module


def _rms_norm(norm: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm's forward on fp32 `h`: its own ops without its dtype casts (bit for bit:
    tests/test_fastpath.py)."""
    return norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


class LlamaStep:
    """One token per row through a Llama model, for `decode`.

    The same computation with the same layers, in fewer ops: each projection called as a plain
    layer (`_plain`), norms and rotary as Llama computes them (rotary on the queries and keys at
    once), and attention written out for one query per row with grouped key/value heads. The
    lm_head is called as a module, so the value head's hook sees its input.

    It holds the keys and values itself, taken over from the prefill's cache: the keys
    transposed, (b * kv_heads, head_dim, length), so that a query's scores are a plain matmul
    against them (against keys laid out as the cache lays them out, the transposed operand
    costs ~1.5x as much: memory-bound, ~1 MB a layer and step); never-written positions are
    never read, so the buffers are not zero-filled.
    """

    def __init__(self, core: torch.nn.Module, prefilled: DynamicCache, length: int) -> None:
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
            b, h, p, d = cached.keys.shape
            keys = cached.keys.new_empty(b * h, d, length)
            keys[:, :, :p] = cached.keys.reshape(b * h, p, d).transpose(1, 2)
            values = cached.values.new_empty(b * h, length, d)
            values[:, :p] = cached.values.reshape(b * h, p, d)
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            projections = (a.q_proj, a.k_proj, a.v_proj, a.o_proj)
            mlps = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            calls = tuple(_plain(m) for m in projections + mlps)
            self.layers.append((*norms, *calls, mlp.act_fn, keys, values))

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
        for n1, n2, q, k, v, o, gate, up, down, act, keys, values in self.layers:
            x = _rms_norm(n1, h)
            qk = torch.cat([q(x), k(x)], -1).view(b, heads + kv_heads, 2, half)
            qk = qk * cos + qk.flip(-2) * sin  # rotary on the queries and keys at once
            keys[:, :, at].view(b, kv_heads, dim).copy_(qk[:, heads:].view(b, kv_heads, dim))
            values[:, at].view(b, kv_heads, dim).copy_(v(x).view(b, kv_heads, dim))
            # query head j reads key/value head j // groups (Llama's repeat_kv), so each
            # (row, kv head) is one small batched matmul over the positions written so far
            queries = qk[:, :heads].reshape(rows, heads // kv_heads, dim)
            weights = torch.baddbmm(bias, queries, keys[:, :, :n], alpha=self.scaling).softmax(-1)
            h = h + o(torch.bmm(weights, values[:, :n]).view(b, heads * dim))
            x = _rms_norm(n2, h)
            h = h + down(act(gate(x)) * up(x))
        # (b, 1, d) into the lm_head: its hook keeps the last position for the value head
        return self.head(_rms_norm(self.norm, h).unsqueeze(1))[:, -1]


def decode(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sampler,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int | None,
) -> torch.Tensor:
    """(b, p + t) prompt then response: a prefill of the left-padded prompts through the model's
    own forward, then one `LlamaStep` per token, each drawn by `sampler.draw` (a
    tether.fastpath.StepSampler), with LoRA folded; it stops when every row has drawn an EOS or
    after `max_new_tokens`. Rows that ended get `pad_token_id` (the first EOS where there is
    none), as generate() writes them."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    b, p = input_ids.shape
    pad = pad_token_id if pad_token_id is not None else eos_token_ids[0]
    eos = torch.tensor(eos_token_ids, device=input_ids.device)
    length = p + max_new_tokens
    new = torch.full((b, max_new_tokens), pad, dtype=input_ids.dtype, device=input_ids.device)
    sequences = torch.cat([input_ids, new], 1)
    # the response's positions are real tokens: the mask grows by ones
    mask = torch.cat([attention_mask, torch.ones_like(new)], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    padding = torch.zeros(b, 1, 1, length, device=mask.device)
    padding.masked_fill_(mask[:, None, None, :] == 0, float("-inf"))
    unfinished = torch.ones(b, dtype=torch.bool, device=input_ids.device)
    n = 0
    # transformers 5.25 renamed past_key_values to cache (the old name warns until 5.40)
    cache_arg = (
        "cache" if "cache" in inspect.signature(core.forward).parameters else "past_key_values"
    )
    with folded_lora(model):
        cache = DynamicCache()
        logits = core(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions[:, :p],
            use_cache=True,
            logits_to_keep=1,
            **{cache_arg: cache},
        ).logits[:, -1]
        step = LlamaStep(core, cache, length)
        del cache  # the step holds the keys and values now
        for t in range(max_new_tokens):
            if t > 0:  # feed the token drawn at t - 1, at position p + t - 1
                at = p + t - 1
                logits = step(sequences[:, at : at + 1], positions[:, at : at + 1], at, padding)
            token = sampler.draw(None, logits).squeeze(1)
            sequences[:, p + t] = torch.where(unfinished, token, pad)
            unfinished &= ~torch.isin(token, eos)
            n = t + 1
            if not unfinished.any():
                break
    return sequences[:, : p + n]
