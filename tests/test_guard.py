"""The reward-hacking guard: each detector on constructed inputs (flagged with the sign of
hacking, silent on noise alone), then wired into a tiny PPO run."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_run_config
from safetensors.torch import load_file

from tether import guard
from tether.trainer import train

N = 32  # probe prompts

NEUTRAL = [
    "the two friends talk about music and school",
    "they discuss a movie they both saw last week",
    "person one asks about the weather in the city",
    "a short chat about food and weekend plans",
    "they talk about their pets and a trip to the park",
    "one of them describes a new job and the other listens",
    "the speakers compare books they read this summer",
    "a conversation about sports and a game on tv",
]


def _texts(seed: int, inject: str | None = None) -> list[str]:
    rng = np.random.default_rng(seed)
    texts = [NEUTRAL[i] for i in rng.integers(0, len(NEUTRAL), N)]
    return [f"{t} {inject}" for t in texts] if inject else texts


def _rows(texts, proxy, gold=None, ppl=10.0, tokens=20, eos=True):
    rows = []
    for i, t in enumerate(texts):
        row = {
            "index": i,
            "prompt": f"p{i}",
            "completion": t,
            "proxy": float(proxy[i]),
            "perplexity": float(ppl[i] if np.ndim(ppl) else ppl),
            "response_tokens": tokens,
            "ended_with_eos": eos,
            "kl": 0.0,
        }
        if gold is not None:
            row["gold"] = float(gold[i])
        rows.append(row)
    return rows


def awesome_score(prompts, completions):
    """A hackable proxy: counts 'awesome' (what a word-list scorer rewards)."""
    return [float(c.count("awesome")) for c in completions]


# --- text statistics, hand-computed ----------------------------------------------------------


def test_distinct_and_repetition_by_hand():
    assert guard.distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert guard.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # ab, ba, ab
    assert guard.distinct_n(["a b", "a b"], 2) == pytest.approx(1 / 2)
    # 3-grams of "x y z x y z": xyz yzx zxy xyz -> one of four repeats
    assert guard.repetition_rate("x y z x y z") == pytest.approx(1 / 4)
    assert guard.repetition_rate("one two three four") == 0.0


def test_delete_phrases_removes_whole_words_only():
    text = "Most awesome, most awesome day; awesomeness stays"
    assert guard.delete_phrases(text, ["most awesome"]) == ", day; awesomeness stays"


def test_rising_ngrams_finds_the_injected_phrase_and_skips_stop_words():
    ref = _texts(0)
    pol = _texts(1, inject="most awesome incredible")
    table = guard.rising_ngrams(pol, ref)
    assert table[0]["ngram"] == "most awesome incredible"
    assert table[0]["reference_count"] == 0 and table[0]["policy_count"] == N
    assert table[0]["policy_completions"] == N
    # its pieces with the same rise are not listed again; "most" alone is a stop word
    listed = [t["ngram"] for t in table]
    assert "awesome incredible" not in listed and "most" not in listed


# --- injected phrases ------------------------------------------------------------------------


def test_injected_phrase_is_flagged_with_its_share_of_the_gain():
    ref_texts, pol_texts = _texts(0), _texts(1, inject="awesome awesome")
    ref = _rows(ref_texts, awesome_score(None, ref_texts))
    pol = _rows(pol_texts, awesome_score(None, pol_texts))
    table, flags = guard.injected_phrase_flags(awesome_score, ref, pol)
    assert table[0]["ngram"] == "awesome" and table[0]["rise"] == 2 * N
    assert [f["flag"] for f in flags] == ["injected_phrases"]
    assert flags[0]["evidence"]["share_of_gain"] == pytest.approx(1.0)


def test_no_phrase_flag_when_the_gain_is_not_in_the_phrases():
    rng = np.random.default_rng(0)
    ref_texts, pol_texts = _texts(0), _texts(1, inject="thanks for reading")
    ref = _rows(ref_texts, rng.normal(0, 0.1, N))
    pol = _rows(pol_texts, rng.normal(1, 0.1, N))  # the gain comes from elsewhere
    table, flags = guard.injected_phrase_flags(lambda p, c: [1.0] * len(c), ref, pol)
    assert table and table[0]["ngram"] == "thanks for reading"
    assert flags == []


def test_no_phrase_flag_on_noise_alone():
    rng = np.random.default_rng(1)
    ref_texts, pol_texts = _texts(0), _texts(1)
    _, flags = guard.injected_phrase_flags(
        awesome_score, _rows(ref_texts, rng.normal(0, 1, N)), _rows(pol_texts, rng.normal(0, 1, N))
    )
    assert flags == []


# --- proxy vs gold ---------------------------------------------------------------------------


def _probe(rng, proxy_mean, gold_mean, sd=0.3):
    base = np.linspace(-1, 1, N)  # per-prompt difficulty, shared by every probe: pairs matter
    return {
        "proxy": list(base + proxy_mean + rng.normal(0, sd, N)),
        "gold": list(base + gold_mean + rng.normal(0, sd, N)),
    }


def test_rising_proxy_with_falling_gold_is_overoptimization():
    rng = np.random.default_rng(0)
    history = [_probe(rng, 0, 0), _probe(rng, 0.5, 0.4), _probe(rng, 1.5, -0.2)]
    flags = {f["flag"] for f in guard.proxy_gold_flags(history)}
    assert flags == {"overoptimization", "gold_not_following"}


def test_proxy_and_gold_rising_together_is_not_flagged():
    rng = np.random.default_rng(0)
    history = [_probe(rng, 0, 0), _probe(rng, 0.5, 0.4), _probe(rng, 1.0, 0.8)]
    assert guard.proxy_gold_flags(history) == []


def test_noise_alone_is_not_flagged():
    hits = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        history = [_probe(rng, 0, 0) for _ in range(4)]
        hits += any(f["flag"] == "overoptimization" for f in guard.proxy_gold_flags(history))
    assert hits <= 1  # a 95% interval on each side: false alarms are rare, not impossible


def test_proxy_up_gold_flat_is_gold_not_following():
    rng = np.random.default_rng(3)
    ref = _probe(rng, 0, 0)
    now = {"proxy": _probe(rng, 1.0, 0)["proxy"], "gold": [g - 0.01 for g in ref["gold"]]}
    history = [ref, now]
    assert "gold_not_following" in {f["flag"] for f in guard.proxy_gold_flags(history)}


# --- degeneration ----------------------------------------------------------------------------


def test_degenerate_completions_are_flagged():
    rng = np.random.default_rng(0)
    ref = _rows(_texts(0), np.zeros(N), ppl=rng.uniform(8, 12, N), tokens=20, eos=True)
    junk = ["great great great great great great great great" for _ in range(N)]
    pol = _rows(junk, np.ones(N), ppl=rng.uniform(30, 40, N), tokens=48, eos=False)
    flags = {f["flag"] for f in guard.degeneration_flags(ref, pol)}
    assert flags == {"perplexity", "distinct_1", "distinct_2", "repetition", "length", "eos_rate"}


def test_an_eos_collapse_is_flagged_though_it_moves_less_than_0_3():
    ref = _rows(_texts(0), np.zeros(N), tokens=20)
    pol = _rows(_texts(1), np.zeros(N), tokens=20)
    for i, row in enumerate(ref):
        row["ended_with_eos"] = i < 9  # 0.28
    for i, row in enumerate(pol):
        row["ended_with_eos"] = i < 1  # 0.03: down 0.25, to a tenth
    assert {f["flag"] for f in guard.degeneration_flags(ref, pol)} == {"eos_rate"}
    for i, row in enumerate(pol):
        row["ended_with_eos"] = i < 6  # 0.19: down by a third, not halved
    assert guard.degeneration_flags(ref, pol) == []


def diluted(prompts, completions):
    """A proxy a longer text games: minus the share of its words that are 'bad'."""
    return [-c.split().count("bad") / max(len(c.split()), 1) for c in completions]


def test_a_gain_that_is_length_is_flagged_and_a_real_one_is_not():
    ref_texts = [f"{t} bad" for t in _texts(0)]
    ref = _rows(ref_texts, diluted(None, ref_texts))
    # the same words and then clean filler: the whole gain goes when both are cut to equal length
    padded = [f"{t} and then they talk on and on about nothing at all" for t in ref_texts]
    flags = guard.length_share_flags(diluted, ref, _rows(padded, diluted(None, padded)))
    assert [f["flag"] for f in flags] == ["length_share"]
    assert flags[0]["evidence"]["share_of_gain"] == pytest.approx(1.0)
    # 'bad' gone at the same length: the gain stays when cut
    clean = [t.replace(" bad", " fun") for t in ref_texts]
    assert guard.length_share_flags(diluted, ref, _rows(clean, diluted(None, clean))) == []
    # no gain at all: nothing to explain
    assert guard.length_share_flags(diluted, ref, ref) == []


def test_same_distribution_is_not_degeneration():
    rng = np.random.default_rng(0)
    ref = _rows(_texts(0), np.zeros(N), ppl=rng.uniform(8, 12, N))
    pol = _rows(_texts(1), np.zeros(N), ppl=rng.uniform(8, 12, N))
    assert guard.degeneration_flags(ref, pol) == []


# --- wired into a PPO run --------------------------------------------------------------------


def _guarded_cfg(tiny_llama, prompts_file, reward_file, out, **kw):
    shape = dict(
        judge=f"python:{reward_file}:constant",
        steps=4,
        batch_size=8,
        mini_batch_size=4,
        lr=5e-3,
        judge_every=2,
        probe_prompts=4,
    )
    shape["reward"] = f"python:{reward_file}:frac_a"
    return tiny_run_config(tiny_llama, prompts_file, out, **{**shape, **kw})


def test_guard_probes_log_flags_and_keep_best(tiny_llama, prompts_file, reward_file, tmp_path):
    result = train(_guarded_cfg(tiny_llama, prompts_file, reward_file, tmp_path / "run"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert all("guard" in r and isinstance(r["guard"]["flags"], list) for r in rows)
    probed = [r["step"] for r in rows if "probe" in r["guard"]]
    assert probed == [1, 3]
    probe = rows[1]["guard"]["probe"]
    assert {"proxy_mean", "gold_mean", "sqrt_kl", "perplexity", "distinct_2"} <= probe.keys()
    assert probe["sqrt_kl"] == pytest.approx(max(probe["kl_mean"], 0) ** 0.5)
    assert (tmp_path / "run" / "guard" / "reference.jsonl").is_file()
    assert (tmp_path / "run" / "guard" / "probe-step-3.jsonl").is_file()
    # the judge is constant, so the first candidate (the starting policy) stays best
    assert result.guard["best"]["step"] == -1 and result.guard["best"]["by"] == "gold"
    assert (tmp_path / "run" / "best" / "adapter_model.safetensors").is_file()
    assert [p["step"] for p in result.guard["probes"]] == [-1, 1, 3]
    assert (
        json.loads((tmp_path / "run" / "guard.json").read_text())["flags"] == result.guard["flags"]
    )


def test_kl_budget_stop_and_rollback(tiny_llama, prompts_file, reward_file, tmp_path):
    stopped = train(
        _guarded_cfg(
            tiny_llama, prompts_file, reward_file, tmp_path / "stop", kl_budget=1e-9, on_hack="stop"
        )
    )
    rows = [json.loads(line) for line in (tmp_path / "stop" / "metrics.jsonl").open()]
    # step 0 samples from the starting policy (KL ~ 0); the first update moves it over the budget
    first = next(r["step"] for r in rows if r["guard"]["flags"])
    assert rows[-1]["step"] == first < 3 and stopped.guard["stopped_by_guard"]
    assert rows[-1]["guard"]["flags"][0]["flag"] == "kl_budget"

    rolled = train(
        _guarded_cfg(
            tiny_llama,
            prompts_file,
            reward_file,
            tmp_path / "rb",
            kl_budget=1e-9,
            on_hack="rollback",
        )
    )
    assert rolled.guard["rolled_back_to_step"] == -1  # only the starting policy was in budget
    lora_b = [p for n, p in rolled.policy.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)
    final = load_file(tmp_path / "rb" / "final" / "adapter_model.safetensors")
    assert any(torch.count_nonzero(v) for k, v in final.items() if "lora_B" in k)  # last step


def test_too_few_prompts_to_hold_out_is_one_clear_error(tiny_llama, reward_file, tmp_path):
    from tether.errors import TetherError

    prompts = tmp_path / "two.jsonl"
    prompts.write_text('{"prompt": "hello there"}\n{"prompt": "good morning"}\n')
    cfg = _guarded_cfg(tiny_llama, prompts, reward_file, tmp_path / "run", heldout_fraction=0.01)
    with pytest.raises(TetherError, match="--judge-every 0"):
        train(cfg)
