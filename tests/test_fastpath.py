"""The CPU fast path against plain Hugging Face sampling (tether.fastpath): the same log-probs
and entropy for the same tokens, the same sampling distribution; the Llama decoding step
(tether.llama_step) against the model's own forward, LoRA folding exact, the version gates."""

import pytest
import torch
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import tether.llama_step as llama_step
from tether import fastpath, torch_ops
from tether.cai.chat import ChatModel
from tether.errors import TetherError
from tether.models import load_model
from tether.policy import Policy
from tether.rollout import SamplingParams

PROMPTS = ["hello", "how are you doing today", "a cat"]


def _nudged_policy(path, fast: bool) -> Policy:
    """A policy whose adapter and value head are not zero (LoRA B is zero at init), the same
    draw for both paths."""
    torch.manual_seed(1)  # LoRA's A matrices are drawn from the global generator
    policy = Policy(load_model(str(path)), temperature=0.7, fast_path=fast)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    return policy


def test_both_paths_give_the_same_tokens_logprobs_entropy_and_values(tiny_model):
    """Greedy decoding takes the argmax in both paths, so the tokens must be identical; then the
    fast path's per-step log-probs and entropy (StepSampler, oneDNN layers, for Llama the
    decoding step with LoRA folded) must be the plain path's (taken from generate()'s output_logits afterwards), and both
    must be what one forward pass over prompt + response computes, to 5e-5. The EOS ban of
    min_new_tokens is on for the first 3 tokens."""
    fast, plain = _nudged_policy(tiny_model, True), _nudged_policy(tiny_model, False)
    sampling = SamplingParams(max_new_tokens=10, min_new_tokens=3, temperature=0.7, do_sample=False)
    a, fast_out, _ = fast.generate(PROMPTS, sampling)
    b, plain_out, _ = plain.generate(PROMPTS, sampling)
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.valid_mask, b.valid_mask)
    assert (a.valid_mask.sum(-1) >= 3).all()
    valid = a.valid_mask.bool()
    # measured: at most 7e-6 (Llama) and 2e-6 (T5) apart; 5e-5 leaves room for other BLAS builds
    for name in ("logprobs", "entropy", "values"):
        x, y = getattr(fast_out, name)[valid], getattr(plain_out, name)[valid]
        torch.testing.assert_close(x, y, atol=5e-5, rtol=0, msg=name)
    with torch.no_grad():
        fwd = plain(a, with_entropy=True)
    for name in ("logprobs", "entropy", "values"):  # measured: at most 1.1e-5 apart
        x, y = getattr(fast_out, name)[valid], getattr(fwd, name)[valid]
        torch.testing.assert_close(x, y, atol=5e-5, rtol=0, msg=name)
    # sampled, truncated by top-k: the plain path's log-probs are still the untruncated ones
    torch.manual_seed(0)
    sampled = SamplingParams(max_new_tokens=10, temperature=0.7, top_k=5)
    c, plain_out, _ = plain.generate(PROMPTS, sampled)
    with torch.no_grad():
        fwd = plain(c, with_entropy=True)
    valid = c.valid_mask.bool()
    for name in ("logprobs", "entropy", "values"):
        x, y = getattr(plain_out, name)[valid], getattr(fwd, name)[valid]
        torch.testing.assert_close(x, y, atol=5e-5, rtol=0, msg=name)


@pytest.mark.parametrize("eos_early", [False, True], ids=["full-length", "rows-end-early"])
def test_fast_path_draws_the_tokens_generate_draws_with_the_same_sampler(tiny_model, eos_early):
    """The fast path (for Llama the decoding step's own loop, `llama_step.decode`) against
    Hugging Face generate() running greedy over the same StepSampler (one uniform per row per step from the global generator): for the same seed the
    same forward passes must give the same tokens, and log-probs, entropy and the values read at
    the lm_head must agree to 1e-5; top-k and min_new_tokens are on (not with `eos_early`).
    With `eos_early` a frequent token is made the EOS so rows end at different steps: the
    padding after each row's EOS and the early stop must be generate()'s too."""
    policy = _nudged_policy(tiny_model, True)
    sampling = SamplingParams(max_new_tokens=12, min_new_tokens=2, temperature=0.9, top_k=20)
    if eos_early:
        # no EOS ban, so making a drawn token the EOS changes no draw before it: row 0 ends there
        sampling = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=20)
        torch.manual_seed(0)
        drawn, _, _ = policy.generate(PROMPTS, sampling)
        policy.eos_token_ids = [int(drawn.response_ids[0, 4])]
    ids, mask, _ = policy.encode_prompts(PROMPTS)
    torch.manual_seed(0)
    rollout, lean, _ = policy.generate(PROMPTS, sampling)
    policy._gen_hidden = []
    sampler = fastpath.StepSampler(sampling, policy.temperature, policy.eos_token_ids)
    torch.manual_seed(0)
    with torch.no_grad():
        out = policy.model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=GenerationConfig(
                do_sample=False,
                max_new_tokens=sampling.max_new_tokens,
                eos_token_id=policy.eos_token_ids,
                pad_token_id=policy.tokenizer.pad_token_id,
                decoder_start_token_id=policy.decoder_start_token_id,
                return_dict_in_generate=True,
            ),
            logits_processor=LogitsProcessorList([sampler]),
        )
    hidden, policy._gen_hidden = policy._gen_hidden, None
    t = len(sampler.logprobs)
    assert torch.equal(rollout.response_ids, out.sequences[:, -t:])
    if eos_early:
        assert not rollout.finished.all() or t < sampling.max_new_tokens
        assert rollout.valid_mask.sum(-1).unique().numel() > 1  # rows of several lengths
    valid = rollout.valid_mask.bool()
    values = policy.value_head(torch.cat(hidden[:t], 1)).squeeze(-1)
    for name, theirs in (
        ("logprobs", torch.cat(sampler.logprobs, 1)),
        ("entropy", torch.cat(sampler.entropy, 1)),
        ("values", values),
    ):
        torch.testing.assert_close(
            getattr(lean, name)[valid], theirs[valid], atol=1e-5, rtol=0, msg=name
        )


@pytest.mark.parametrize("adapter", ["folded", "off"])
def test_llama_step_samples_what_the_models_own_forward_samples(
    tiny_llama, tiny_t5, monkeypatch, adapter
):
    """The Llama decoding step (`llama_step.LlamaStep`, every step after the prefill) against
    generate() over the model's own forward (its fallback): prompts of different lengths (left
    padding), sampled with top-k, the same seed, so the same tokens, and log-probs, entropy and
    values to 1e-5, for each way the LoRA layers run while sampling: folded into the base
    weights (the default) and disabled (the reference)."""
    policy = _nudged_policy(tiny_llama, True)
    assert llama_step.tested()  # the installed transformers is one the step was tested on
    assert llama_step.applies(policy.model, sharded=False)
    assert not llama_step.applies(policy.model, sharded=True)  # FSDP2 gathers in module hooks
    assert not llama_step.applies(load_model(str(tiny_t5)).model, sharded=False)
    bf16 = load_model(str(tiny_llama), dtype="bfloat16").model
    assert not llama_step.applies(bf16, sharded=False)
    sampling = SamplingParams(max_new_tokens=10, min_new_tokens=2, temperature=0.9, top_k=20)
    steps = []
    step = llama_step.LlamaStep.__call__
    monkeypatch.setattr(llama_step.LlamaStep, "__call__", lambda *a: steps.append(1) or step(*a))

    def sample(lean: bool):
        monkeypatch.setenv(llama_step.ENV_VAR, "1" if lean else "0")
        torch.manual_seed(0)
        if adapter == "off":
            with policy.reference():
                return policy.generate(PROMPTS, sampling)
        return policy.generate(PROMPTS, sampling)

    (theirs, their_out, _), (ours, our_out, _) = sample(lean=False), sample(lean=True)
    assert len(steps) == ours.response_ids.shape[1] - 1  # every step after the prefill
    assert torch.equal(ours.response_ids, theirs.response_ids)
    valid = ours.valid_mask.bool()
    for name in ("logprobs", "entropy", "values"):
        x, y = getattr(our_out, name)[valid], getattr(their_out, name)[valid]
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0, msg=name)


def test_the_version_gates_fall_back_to_the_public_path(tiny_llama, monkeypatch):
    """Outside the transformers releases it was tested on, the Llama step stands aside (the
    model's own forward decodes); outside the tested torch releases tether's private-op
    wrappers run the public ops, with the same results; TETHER_LLAMA_STEP=0 turns the step off
    and an unreadable value is refused."""
    model = load_model(str(tiny_llama)).model
    assert llama_step.applies(model, sharded=False)
    assert llama_step.tested("5.25.0") and not llama_step.tested("6.0.0")
    assert not llama_step.tested("4.57.1")
    monkeypatch.setattr(llama_step, "TESTED", ((9, 0), (9, 1)))
    assert not llama_step.applies(model, sharded=False)
    monkeypatch.undo()
    monkeypatch.setenv(llama_step.ENV_VAR, "0")
    assert not llama_step.applies(model, sharded=False)
    monkeypatch.setenv(llama_step.ENV_VAR, "maybe")
    with pytest.raises(TetherError, match="'maybe'"):
        llama_step.enabled()
    assert torch_ops._tested("2.13.0") and not torch_ops._tested("2.3.1")
    assert not torch_ops._tested("3.0.0")
    torch.manual_seed(0)
    x, w = torch.randn(5, 16), torch.randn(7, 16)
    out = torch.empty(5, 16)
    private = torch_ops.onednn_linear(x, w, None), torch_ops.log_softmax_into(x, out).clone()
    monkeypatch.setattr(torch_ops, "_PRIVATE", False)
    monkeypatch.setattr(torch_ops, "_ONEDNN_LINEAR", None)
    assert not torch_ops.has_onednn_linear()
    public = torch_ops.onednn_linear(x, w, None), torch_ops.log_softmax_into(x, out)
    assert public[1] is out
    torch.testing.assert_close(public[0], x @ w.T, atol=1e-5, rtol=0)
    for a, b in zip(private, public, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _exact_first_token_probs(model, enc, sampling: SamplingParams, eos: int) -> torch.Tensor:
    """(v,) the first token's distribution as Hugging Face's own processors shape it, from one
    plain forward: EOS banned under min_new_tokens, logits / temperature, top-k, top-p."""
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            ids = torch.full_like(enc["input_ids"][:, :1], model.config.decoder_start_token_id)
            logits = model(**enc, decoder_input_ids=ids).logits[:, -1]
        else:
            ids = enc["input_ids"]
            logits = model(**enc).logits[:, -1]
    processors = LogitsProcessorList(
        [TemperatureLogitsWarper(sampling.temperature)]
        + ([TopKLogitsWarper(sampling.top_k)] if sampling.top_k else [])
        + ([TopPLogitsWarper(sampling.top_p)] if sampling.top_p < 1 else [])
    )
    if sampling.min_new_tokens:
        processors.insert(
            0, MinNewTokensLengthLogitsProcessor(ids.shape[1], sampling.min_new_tokens, eos)
        )
    return torch.softmax(processors(ids, logits.float()), -1)[0]


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(max_new_tokens=1, min_new_tokens=1, temperature=0.8),
        SamplingParams(max_new_tokens=1, temperature=1.3, top_k=8, top_p=0.8),
    ],
    ids=["eos-banned", "top-k-top-p"],
)
def test_both_paths_draw_from_the_same_distribution(tiny_model, sampling):
    """20,000 draws of one prompt's first token by each path: the empirical frequencies must
    match the exact distribution (Hugging Face's processors on one forward's logits) to 0.014,
    about 4 standard errors at p = 0.5; tokens cut by top-k/top-p or banned EOS never come.
    The check can fail: the same frequencies miss the distribution at another temperature."""
    loaded = load_model(str(tiny_model))
    model, tok = loaded.model.eval(), loaded.tokenizer
    tok.padding_side = "left"
    n = 20_000
    enc = tok(["how are you"] * n, return_tensors="pt")
    eos = tok.eos_token_id
    one = {k: v[:1] for k, v in enc.items()}
    if sampling.min_new_tokens:
        # make EOS as likely as the likeliest token (its lm_head row a copy of that token's),
        # so that banning it is a real change to the distribution
        unbanned = SamplingParams(max_new_tokens=1, temperature=sampling.temperature)
        top = _exact_first_token_probs(model, one, unbanned, eos).argmax()
        with torch.no_grad():
            head = model.get_output_embeddings().weight
            head[eos] = head[top]
        assert _exact_first_token_probs(model, one, unbanned, eos)[eos] > 0.1
    exact = _exact_first_token_probs(model, one, sampling, eos)
    other = SamplingParams(**{**sampling.__dict__, "temperature": sampling.temperature + 0.5})
    wrong = _exact_first_token_probs(model, one, other, eos)
    assert (exact == 0).any()  # something is cut, so "never drawn" is tested
    for fast in (True, False):
        torch.manual_seed(0)
        drawn = fastpath.sample(
            model,
            enc["input_ids"],
            enc["attention_mask"],
            sampling,
            sampling.temperature,
            [eos],
            tok.pad_token_id,
            getattr(model.config, "decoder_start_token_id", None),
            fast=fast,
        ).response_ids[:, 0]
        freq = torch.bincount(drawn, minlength=exact.numel()).float() / n
        assert freq[exact == 0].sum() == 0, fast
        assert (freq - exact).abs().max() < 0.014, (fast, (freq - exact).abs().max())
        assert (freq - wrong).abs().max() > 0.02, (fast, (freq - wrong).abs().max())


@pytest.mark.parametrize("vocab", [49152, 32128, 300, 7])  # SmolLM2's, T5's, and not 256s
def test_inverse_cdf_draws_the_token_one_running_sum_over_the_row_draws(vocab):
    """`fastpath.inverse_cdf` (the block's sum, then the token in the block) against the one
    float64 running sum over the whole row it replaces, on the same uniforms: the same token
    for each of 3,200 draws from peaked distributions with zeroed (banned) tokens, none of
    which is ever drawn; and where float rounding leaves u past a block's running sum."""
    torch.manual_seed(0)
    for _ in range(200):
        weights = torch.softmax(torch.randn(16, vocab) * 4, -1)
        weights[:, torch.randint(0, vocab, (3,))] = 0.0
        uniform = torch.rand(16, 1, dtype=torch.float64)
        cdf = weights.cumsum(-1, dtype=torch.float64)
        theirs = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).clamp(max=vocab - 1)
        ours = fastpath.inverse_cdf(weights, uniform)
        assert torch.equal(ours, theirs)
        # the sampler's float64 scratch for the blocks gives the same draw
        blocks = (16, -(-vocab // fastpath.CDF_BLOCK), fastpath.CDF_BLOCK)
        wide = torch.full(blocks, torch.nan, dtype=torch.float64)
        assert torch.equal(fastpath.inverse_cdf(weights, uniform, wide), theirs)
        assert (weights.gather(-1, ours) > 0).all()
    # a block whose own sum (vectorised) exceeds its running sum (1 + 2^-54 rounds to 1): u
    # past the running sum's end draws the block's last token of positive weight, not a
    # banned token behind it, nor one past the block
    weights = torch.zeros(1, 256)
    weights[0, 0], weights[0, 1:255] = 1.0, 2.0**-54
    top = torch.nextafter(
        torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    )
    assert fastpath.inverse_cdf(weights, top).item() == 254
    assert fastpath.inverse_cdf(weights, top * 0.99).item() == 0
    # NaN weights (a poisoned model, which the guard then stops) still give a token id
    assert 0 <= fastpath.inverse_cdf(weights[:, :7] * torch.nan, top).item() < 7


def test_the_llama_steps_norm_is_llamas_bit_for_bit():
    """LlamaStep's norm (`llama_step._rms_norm`) against LlamaRMSNorm's own forward: equal bit
    for bit at activations of very different scales."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(576, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    for scale in (1e-3, 1.0, 30.0, 1e3):
        h = torch.randn(16, 576) * scale
        assert torch.equal(llama_step._rms_norm(norm, h), norm(h)), scale


def test_folded_lora_gives_the_adapters_logits_and_restores_the_base_bit_for_bit(tiny_model):
    """Inside `folded_lora` the plain layers with B A * scale added compute what LoRA's own
    layers did (to 1e-5); afterwards every base weight is bit-for-bit what it was. With the
    adapter disabled (the reference) it folds nothing."""
    policy = _nudged_policy(tiny_model, True)
    model = policy.model
    enc = policy.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    extra = {}
    if policy.is_encoder_decoder:
        extra["decoder_input_ids"] = torch.zeros_like(enc["input_ids"][:, :4])
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" not in n}
    with torch.no_grad():
        adapted = model(**enc, **extra).logits
        with model.disable_adapter():
            reference = model(**enc, **extra).logits
            with llama_step.folded_lora(model):
                still_reference = model(**enc, **extra).logits
        with llama_step.folded_lora(model):
            changed = [n for n, p in model.named_parameters() if not torch.equal(p, base.get(n, p))]
            folded = model(**enc, **extra).logits
    assert changed  # it did fold, into the base weights
    torch.testing.assert_close(folded, adapted, atol=1e-5, rtol=0)
    assert (folded - reference).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(still_reference, reference, atol=0, rtol=0)
    for n, p in model.named_parameters():
        if "lora" not in n:
            assert torch.equal(p, base[n]), n


def test_one_switch_selects_the_plain_path(tiny_llama, monkeypatch):
    """TETHER_FAST_PATH=0 (or fast_path=False) gives the plain lm_head and plain generate();
    an unreadable value is refused with the value; an explicit argument beats the variable."""
    monkeypatch.delenv("TETHER_FAST_PATH", raising=False)
    assert fastpath.enabled() is True
    on = Policy(load_model(str(tiny_llama)))
    assert on.fast_path and on.model.get_output_embeddings().forward.func is fastpath.frozen_linear
    monkeypatch.setenv("TETHER_FAST_PATH", "0")
    assert fastpath.enabled() is False and fastpath.enabled(True) is True
    off = Policy(load_model(str(tiny_llama)))
    chat = ChatModel(load_model(str(tiny_llama)))
    assert not off.fast_path and not chat.fast_path
    for head in (off.model.get_output_embeddings(), chat.model.get_output_embeddings()):
        assert "forward" not in vars(head)  # nn.Linear's own forward
    torch.manual_seed(0)
    rollout, out, _ = off.generate(PROMPTS, SamplingParams(max_new_tokens=5))
    assert rollout.response_ids.shape[0] == 3 and out.logprobs.shape == rollout.valid_mask.shape
    assert len(chat.generate(PROMPTS, 5, 1.0, seed=0)) == 3
    monkeypatch.setenv("TETHER_FAST_PATH", "maybe")
    with pytest.raises(TetherError, match="'maybe'"):
        fastpath.enabled()
