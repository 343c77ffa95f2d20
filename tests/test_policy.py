"""The policy interface: one forward pass, padding invariance, the shared reference."""

import pytest
import torch
from conftest import save_sft_adapter

from tether.fastpath import frozen_linear
from tether.models import load_model
from tether.policy import Policy
from tether.rollout import SamplingParams, response_valid_mask

PROMPTS = ["hello", "how are you doing today", "a cat"]


def _policy(path, **kw):
    return Policy(load_model(str(path)), **kw)


def test_padded_batch_equals_single_rows(tiny_model):
    """Left/right padding and trimming must not change any row's log-probs or values."""
    policy = _policy(tiny_model)
    torch.manual_seed(0)
    rollout, _, _ = policy.generate(PROMPTS, SamplingParams(max_new_tokens=10))
    # LoRA B is zero at init: nudge the adapter and value head so the check is not trivial
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
        batch = policy(rollout)
        for i in range(len(PROMPTS)):
            row = rollout.select(torch.tensor([i]))
            single = policy(row)
            n = row.response_ids.shape[1]
            torch.testing.assert_close(
                single.logprobs[0], batch.logprobs[i, :n], atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(single.values[0], batch.values[i, :n], atol=1e-5, rtol=1e-5)


def test_reference_is_the_base_model_and_costs_no_copy(tiny_model):
    policy = _policy(tiny_model)
    plain = load_model(str(tiny_model))
    torch.manual_seed(0)
    rollout, _, _ = policy.generate(PROMPTS, SamplingParams(max_new_tokens=8))
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.2 * torch.randn_like(p))
        trained = policy(rollout).logprobs
        with policy.reference():
            ref = policy(rollout, with_values=False).logprobs
        # the same tokens scored by a separately loaded, adapter-free copy of the base
        other = Policy(plain, reference="shared")
        with other.reference():
            expected = other(rollout, with_values=False).logprobs
    valid = rollout.valid_mask.bool()
    torch.testing.assert_close(ref[valid], expected[valid], atol=1e-5, rtol=1e-5)
    assert (trained - ref)[valid].abs().max() > 1e-3  # the adapter really was off
    # the shared reference holds no second set of base weights
    n_base = sum(p.numel() for p in plain.model.parameters())
    n_policy = sum(p.numel() for p in policy.parameters())
    assert n_policy < 1.5 * n_base


def test_only_lora_and_value_head_train(tiny_model):
    policy = _policy(tiny_model)
    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or n.startswith("value_head") for n in names)
    assert not policy.training  # dropout off


def test_generation_respects_sampling_and_masks(tiny_llama):
    policy = _policy(tiny_llama)
    torch.manual_seed(0)
    rollout, _, _ = policy.generate(PROMPTS, SamplingParams(max_new_tokens=6, min_new_tokens=6))
    assert rollout.response_ids.shape == (3, 6)
    assert rollout.valid_mask.sum(-1).tolist() == [6, 6, 6]  # min_new_tokens forbids early EOS
    # greedy decoding is deterministic
    a, _, _ = policy.generate(PROMPTS, SamplingParams(max_new_tokens=6, do_sample=False))
    b, _, _ = policy.generate(PROMPTS, SamplingParams(max_new_tokens=6, do_sample=False))
    assert torch.equal(a.response_ids, b.response_ids)


def test_response_valid_mask_includes_first_eos_only():
    ids = torch.tensor([[5, 6, 1, 1, 1], [1, 7, 7, 7, 7], [5, 5, 5, 5, 5]])
    assert response_valid_mask(ids, [1]).tolist() == [
        [1, 1, 1, 0, 0],
        [1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1],
    ]


def test_prompt_truncation_is_counted(tiny_llama):
    policy = _policy(tiny_llama, max_prompt_tokens=5)
    ids, mask, n_cut = policy.encode_prompts(["abcdefghij", "abc"])
    assert n_cut == 1 and ids.shape[1] == 5
    # cut from the left: the end of the prompt survives
    assert policy.tokenizer.decode(ids[0]) == "fghij"


def test_starting_adapter_is_merged_so_reference_is_starting_policy(tiny_model, tmp_path):
    """Start from a non-trivial SFT adapter: the reference must be that policy (KL ~ 0)."""
    save_sft_adapter(tiny_model, tmp_path / "sft")
    policy = _policy(tiny_model, adapter=str(tmp_path / "sft"))
    raw = _policy(tiny_model)
    torch.manual_seed(0)
    rollout, _, _ = policy.generate(PROMPTS, SamplingParams(max_new_tokens=8))
    with torch.no_grad():
        start = policy(rollout).logprobs
        with policy.reference():
            ref = policy(rollout, with_values=False).logprobs
        with raw.reference():
            raw_base = raw(rollout, with_values=False).logprobs
    valid = rollout.valid_mask.bool()
    assert (start - ref)[valid].abs().max() < 1e-5  # initial KL ~ 0
    assert (start - raw_base)[valid].abs().max() > 1e-2  # and the adapter did change the model


def test_save_and_load_trainable_round_trip(tiny_llama, tmp_path):
    a = _policy(tiny_llama)
    with torch.no_grad():
        for p in a.trainable_parameters():
            p.add_(torch.randn_like(p))
    a.save(tmp_path / "ckpt")
    b = _policy(tiny_llama)
    b.load_trainable(tmp_path / "ckpt")
    for pa, pb in zip(a.trainable_parameters(), b.trainable_parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "value_head.safetensors",
    ]


@pytest.mark.parametrize("reference", ["full-copy"])
def test_full_copy_reference_matches_shared(tiny_llama, reference):
    shared = _policy(tiny_llama)
    copy = _policy(tiny_llama, reference=reference)
    torch.manual_seed(0)
    rollout, _, _ = shared.generate(PROMPTS, SamplingParams(max_new_tokens=8))
    with torch.no_grad():
        with shared.reference():
            a = shared(rollout, with_values=False).logprobs
        with copy.reference():
            b = copy(rollout, with_values=False).logprobs
    torch.testing.assert_close(a, b)


def test_generation_pass_gives_the_forward_logprobs_and_values(tiny_model):
    """The rollout log-probs/values come from the sampling pass (no second forward): they must
    equal what a full forward over prompt + response computes."""
    policy = _policy(tiny_model, temperature=0.7)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.manual_seed(0)
    rollout, gen, _ = policy.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0.7))
    with torch.no_grad():
        fwd = policy(rollout, with_entropy=True)
    valid = rollout.valid_mask.bool()
    torch.testing.assert_close(gen.logprobs[valid], fwd.logprobs[valid], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gen.values[valid], fwd.values[valid], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gen.entropy[valid], fwd.entropy[valid], atol=1e-4, rtol=1e-4)
    assert (gen.logprobs[~valid] == 0).all()


def test_sampling_with_the_adapter_folded_leaves_the_base_weights_exact(tiny_model):
    """Generation adds each LoRA delta into its base weight for speed; afterwards the base
    weights (and so the reference) must be bit-for-bit what they were."""
    policy = _policy(tiny_model)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    base = {n: p.detach().clone() for n, p in policy.model.named_parameters() if "lora" not in n}
    torch.manual_seed(0)
    rollout, gen, _ = policy.generate(PROMPTS, SamplingParams(max_new_tokens=6))
    for n, p in policy.model.named_parameters():
        if "lora" not in n:
            assert torch.equal(p, base[n]), n
    with torch.no_grad():  # sampled from the adapted policy, not the reference
        (fwd,) = (policy(rollout),)
        with policy.reference():
            ref = policy(rollout, with_values=False)
    valid = rollout.valid_mask.bool()
    torch.testing.assert_close(gen.logprobs[valid], fwd.logprobs[valid], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(gen.logprobs[valid], ref.logprobs[valid], atol=1e-3)


def test_model_cache_marker_detects_partial_or_corrupt_copies(tmp_path):
    from tether.models import _cache_is_complete

    d = tmp_path / "cache"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"x" * 100)
    assert not _cache_is_complete(d)  # no marker: a conversion that died before the end
    (d / "tether-complete.json").write_text('{"files": {"model.safetensors": 100}}')
    assert _cache_is_complete(d)
    (d / "model.safetensors").write_bytes(b"x" * 50)  # truncated
    assert not _cache_is_complete(d)
    (d / "tether-complete.json").write_text("{not json")
    assert not _cache_is_complete(d)


def test_step_sampler_draws_from_the_softmax_and_records_raw_logprobs():
    """The sampler generate() runs with: inverse-CDF draws match softmax(logits / T); EOS is
    never drawn before min_new_tokens; top-k cuts; log-probs are the untruncated ones PPO uses."""
    from tether.fastpath import StepSampler

    torch.manual_seed(0)
    raw = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5]).repeat(40_000, 1)
    temp = 0.8
    expected = torch.softmax(raw[0] / temp, -1)

    sampler = StepSampler(SamplingParams(temperature=temp), temp, eos_ids=[0])
    onehot = sampler(torch.zeros(40_000, 1, dtype=torch.long), raw)
    token = onehot.argmax(-1)
    assert torch.equal(onehot.isfinite().sum(-1), torch.ones(40_000, dtype=torch.long))
    freq = torch.bincount(token, minlength=5).float() / len(token)
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)
    torch.testing.assert_close(
        sampler.logprobs[0].squeeze(-1), expected.log()[token], atol=1e-6, rtol=1e-6
    )
    entropy = -(expected * expected.log()).sum()
    torch.testing.assert_close(sampler.entropy[0][0, 0], entropy, atol=1e-6, rtol=1e-6)

    # min_new_tokens = 1 bans EOS (id 0) at the first step only; the log-prob stays the raw one
    banned = StepSampler(SamplingParams(temperature=temp, min_new_tokens=1), temp, eos_ids=[0])
    first = banned(torch.zeros(40_000, 1, dtype=torch.long), raw).argmax(-1)
    assert (first != 0).all()
    freq = torch.bincount(first, minlength=5).float() / len(first)
    torch.testing.assert_close(freq[1:], expected[1:] / expected[1:].sum(), atol=0.01, rtol=0)
    torch.testing.assert_close(banned.logprobs[0].squeeze(-1), expected.log()[first])
    second = banned(torch.zeros(40_000, 2, dtype=torch.long), raw).argmax(-1)
    assert (second == 0).any()

    top2 = StepSampler(SamplingParams(temperature=temp, top_k=2), temp, eos_ids=[0])
    assert set(top2(torch.zeros(40_000, 1, dtype=torch.long), raw).argmax(-1).tolist()) == {0, 1}

    greedy = StepSampler(SamplingParams(temperature=temp, do_sample=False), temp, eos_ids=[3])
    assert (greedy(torch.zeros(4, 1, dtype=torch.long), raw[:4]).argmax(-1) == 0).all()


@pytest.mark.parametrize("bias", [False, True])
def test_frozen_linear_matches_nn_linear_values_and_input_gradient(bias):
    """The oneDNN path of a frozen fp32 layer on CPU computes what nn.Linear does, for 2-D
    and 3-D inputs and a non-contiguous slice (logits_to_keep hands it one), and gives the input
    the same gradient."""
    torch.manual_seed(0)
    head = torch.nn.Linear(24, 300, bias=bias).requires_grad_(False)
    for x in (torch.randn(5, 24), torch.randn(3, 7, 24), torch.randn(3, 9, 24)[:, 2:-1]):
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        fast, plain = (
            frozen_linear(head, x1),
            torch.nn.functional.linear(x2, head.weight, head.bias),
        )
        assert type(fast.grad_fn).__name__ == "_OneDnnLinearBackward"  # the fast path ran
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
        grad = torch.randn_like(plain)
        fast.backward(grad)
        plain.backward(grad)
        torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)


def test_frozen_linear_falls_back_where_the_layer_trains_or_is_not_fp32():
    """A head that trains gets its weight gradient (nn.Linear's path); other dtypes also take it."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50)
    frozen_linear(head, torch.randn(2, 8)).sum().backward()
    assert head.weight.grad is not None and head.bias.grad is not None
    head64 = torch.nn.Linear(8, 50, dtype=torch.float64).requires_grad_(False)
    x = torch.randn(2, 8, dtype=torch.float64)
    assert frozen_linear(head64, x).dtype == torch.float64
    torch.testing.assert_close(frozen_linear(head64, x), head64(x))


def test_policy_routes_its_plain_linear_layers_through_frozen_linear(tiny_llama):
    """The policy's head and base layers (and a full-copy reference's) run frozen_linear, and
    the logits are the model's own; LoRA's own matrices train, so nn.Linear's path runs them."""
    policy = _policy(tiny_llama, reference="full-copy")
    for model in (policy.model.base_model.model, policy._ref_model):
        head = model.get_output_embeddings()
        assert head.forward.func is frozen_linear
        q_proj = model.model.layers[0].self_attn.q_proj
        assert getattr(q_proj, "base_layer", q_proj).forward.func is frozen_linear
        x = torch.randn(2, 3, head.in_features)
        torch.testing.assert_close(head(x), torch.nn.functional.linear(x, head.weight))


def test_peft_all_linear_passes_through(tiny_model, tmp_path):
    # `--lora-target-modules all-linear` is PEFT's special value, not a module named so: every
    # linear layer but the output head gets an adapter (q/v only by default)
    from tether.policy import LoraSettings

    default = _policy(tiny_model)
    every = _policy(tiny_model, lora=LoraSettings(target_modules=["all-linear"]))

    def adapted(policy):
        return {n.split(".")[-1] for n, m in policy.model.named_modules() if hasattr(m, "lora_A")}

    assert adapted(default) < adapted(every)
    assert len(adapted(every)) >= 4 and "lm_head" not in adapted(every)
    every.save(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
