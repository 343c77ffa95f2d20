"""The GPU path's decisions, checked where they can be on the CPU, and on CUDA where there is one.

On the CPU: a model off the CPU (here a meta-device copy, which is what a CUDA model looks like
to the predicates: only `device.type` is read) never takes oneDNN's linears or the Llama
decoding step; models load with SDPA attention; static-cache decoding (off by default) samples
what the default path samples. The `device` tests run only where torch sees a CUDA device
(benchmarks/device_check.sh runs `pytest -m device` there); torch.compile is not exercised on
the CPU: transformers compiles generate() only on an accelerator.
"""

import pytest
import torch

import tether.llama_step as llama_step
from tether import fastpath, torch_ops
from tether.models import load_model
from tether.policy import Policy
from tether.rollout import SamplingParams

PROMPTS = ["hello", "how are you doing today", "a cat"]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _on_meta(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose weights live on the meta device: a non-CPU device to the
    predicates, without a GPU."""
    return model.to_empty(device="meta")


def test_llama_step_and_onednn_apply_on_the_cpu_only(tiny_llama):
    """The skip conditions themselves: the CPU fp32 model takes both (so the checks below are
    not vacuous), the same model off the CPU takes neither, and nothing is installed on it."""
    model = load_model(str(tiny_llama)).model
    assert llama_step.applies(model, sharded=False)
    assert fastpath.onednn_applies(model) == torch_ops.has_onednn_linear()
    off_cpu = _on_meta(load_model(str(tiny_llama)).model)
    assert not llama_step.applies(off_cpu, sharded=False)
    assert not fastpath.onednn_applies(off_cpu)
    fastpath.use_onednn_linears(off_cpu)
    linears = [m for m in off_cpu.modules() if type(m) is torch.nn.Linear]
    assert linears and all("forward" not in vars(m) for m in linears)  # nn.Linear's own forward


def test_bf16_llama_takes_the_models_own_decoding(tiny_llama):
    """A bf16 base (the GPU configuration) decodes through the model's forward on any device."""
    model = load_model(str(tiny_llama), dtype="bfloat16").model
    assert not llama_step.applies(model, sharded=False)


def test_models_load_with_sdpa_attention(tiny_model):
    loaded = load_model(str(tiny_model))
    assert loaded.model.config._attn_implementation == "sdpa"


def _policy(path, fast: bool, device: str = "cpu", dtype: str = "float32") -> Policy:
    torch.manual_seed(1)  # LoRA's A matrices are drawn from the global generator
    policy = Policy(
        load_model(str(path), dtype=dtype, device=device),
        temperature=0.7,
        fast_path=fast,
        value_head=False,
    )
    with torch.no_grad():  # a non-zero adapter (LoRA B starts at 0)
        for p in policy.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    return policy


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_static_decoding_samples_what_the_default_decoding_samples(tiny_model, fast, monkeypatch):
    """Static cache + prompts padded to a bucket against the default dynamic cache, same seed:
    the same tokens, and log-probs and entropy to 1e-5 (measured: ~1e-6; the padded keys are
    masked out, only the order of float sums can differ). The Llama step is off so that both
    runs go through generate()."""
    monkeypatch.setenv(llama_step.ENV_VAR, "0")
    policy = _policy(tiny_model, fast)
    sampling = SamplingParams(max_new_tokens=10, min_new_tokens=2, temperature=0.7)
    runs = []
    for static in (False, True):
        monkeypatch.setenv(fastpath.STATIC_ENV_VAR, "1" if static else "0")
        torch.manual_seed(0)
        runs.append(policy.generate(PROMPTS, sampling))
    (a, a_out, _), (b, b_out, _) = runs
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.prompt_ids, b.prompt_ids)
    valid = a.valid_mask.bool()
    for name in ("logprobs", "entropy"):
        torch.testing.assert_close(
            getattr(a_out, name)[valid], getattr(b_out, name)[valid], atol=1e-5, rtol=0
        )


def test_static_decoding_is_off_by_default(monkeypatch):
    monkeypatch.delenv(fastpath.STATIC_ENV_VAR, raising=False)
    assert not fastpath.static_decoding()
    monkeypatch.setenv(fastpath.STATIC_ENV_VAR, "1")
    assert fastpath.static_decoding()
    assert not fastpath.static_decoding(False)


def test_bucketing_pads_on_the_side_generation_reads():
    ids, mask = torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)
    left, left_mask, extra = fastpath._bucketed(ids, mask, 0, left=True)
    assert extra == fastpath.STATIC_BUCKET - 5 and left.shape[1] == fastpath.STATIC_BUCKET
    assert left_mask[:, :extra].sum() == 0 and left[:, extra:].eq(1).all()
    right, right_mask, _ = fastpath._bucketed(ids, mask, 0, left=False)
    assert right_mask[:, 5:].sum() == 0 and right[:, :5].eq(1).all()


# ----------------------------------------------------------------------------------------------
# on CUDA (benchmarks/device_check.sh: pytest -m device)
# ----------------------------------------------------------------------------------------------


@pytest.mark.device
@needs_cuda
@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_cuda_bf16_sampling_logprobs_match_the_forward_pass(tiny_model, static, monkeypatch):
    """bf16 base, fp32 LoRA on CUDA: no CPU-only code is installed or taken, attention is SDPA,
    and the log-probs recorded while sampling are what the training forward computes, within
    bf16 tolerance (the two passes run different kernels: incremental vs full attention)."""
    monkeypatch.setenv(fastpath.STATIC_ENV_VAR, "1" if static else "0")
    policy = _policy(tiny_model, fast=True, device="cuda", dtype="bfloat16")
    base = policy.model.get_base_model()
    assert base.config._attn_implementation == "sdpa"
    assert not llama_step.applies(policy.model, sharded=False)
    assert all("forward" not in vars(m) for m in base.modules() if type(m) is torch.nn.Linear)
    assert {p.dtype for p in policy.trainable_parameters()} == {torch.float32}
    torch.manual_seed(0)
    rollout, out, _ = policy.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=0.7))
    assert rollout.response_ids.device.type == "cuda"
    with torch.no_grad():
        fwd = policy(rollout, with_values=False)
    valid = rollout.valid_mask.bool()
    torch.testing.assert_close(out.logprobs[valid], fwd.logprobs[valid], atol=0.1, rtol=0.05)


@pytest.mark.device
@needs_cuda
def test_cuda_fp32_llama_decodes_through_the_models_forward(tiny_llama):
    """The CPU Llama step is for CPU dispatch costs: an fp32 Llama on CUDA does not take it, and
    its fast path agrees with plain generate() on the same greedy tokens."""
    fast = _policy(tiny_llama, fast=True, device="cuda")
    plain = _policy(tiny_llama, fast=False, device="cuda")
    assert not llama_step.applies(fast.model, sharded=False)
    greedy = SamplingParams(max_new_tokens=10, temperature=0.7, do_sample=False)
    a, a_out, _ = fast.generate(PROMPTS, greedy)
    b, b_out, _ = plain.generate(PROMPTS, greedy)
    assert torch.equal(a.response_ids, b.response_ids)
    valid = a.valid_mask.bool()
    torch.testing.assert_close(a_out.logprobs[valid], b_out.logprobs[valid], atol=1e-4, rtol=0)
