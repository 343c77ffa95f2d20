"""The embedded default plugins against the real (small, offline) packages: alt-profanity-check
(proxy reward), HateSonar (gold judge) and chitchat-dataset (prompts)."""

import math
import os
import subprocess
import sys

import pytest

from tether.data import PromptRecord, load_prompts
from tether.data.chitchat import (
    CHITCHAT_TEMPLATE,
    load_chitchat,
    load_chitchat_dialogues,
    render_dialogue,
    score_dialogues,
    split_bucket,
)
from tether.errors import TetherError
from tether.rewards import RewardModel, checked_scores
from tether.rewards.hatesonar import LOCALE_FIX, HateSonarJudge, locale_available
from tether.rewards.profanity import ProfanityReward

FRIENDLY = "Thank you so much for your help, have a lovely day!"
INSULT = "Shut up you stupid fucking idiot, you worthless piece of shit."
PREFIX, SUFFIX = CHITCHAT_TEMPLATE.split("{dialogue}")


@pytest.fixture(scope="module")
def profanity():
    return ProfanityReward()


@pytest.fixture(scope="module")
def profanity_logit():
    return ProfanityReward("logit")


def dialogue_of(record: PromptRecord) -> str:
    assert record.prompt.startswith(PREFIX) and record.prompt.endswith(SUFFIX)
    return record.prompt[len(PREFIX) : len(record.prompt) - len(SUFFIX)]


# --- alt-profanity-check -------------------------------------------------------------------


def test_profanity_ranks_insult_below_friendly_in_both_modes(profanity, profanity_logit):
    texts = [FRIENDLY, INSULT, FRIENDLY]
    prompts = ["p"] * 3
    for reward in (profanity, profanity_logit):
        assert isinstance(reward, RewardModel)
        scores = checked_scores(reward, prompts, texts)
        assert len(scores) == 3
        assert scores[1] < scores[0] == scores[2]
    assert profanity.name == "profanity" and profanity_logit.name == "profanity@logit"
    p = profanity.offensive_prob(texts)
    assert p[1] > 0.9 > 0.2 > p[0]
    assert profanity.score(prompts, texts) == pytest.approx([1 - x for x in p])
    assert profanity.offensive_prob([]) == [] and profanity.score([], []) == []


def test_profanity_logit_is_monotone_and_clipped(profanity, profanity_logit):
    grid = [0.0, 1e-9, 1e-4, 0.01, 0.05, 0.1, 0.5, 0.9, 0.99, 1 - 1e-9, 1.0]
    rewards = [profanity_logit.reward_from_prob(p) for p in grid]
    assert all(a >= b for a, b in zip(rewards, rewards[1:], strict=False))
    assert rewards[0] == 10.0 and rewards[-1] == -10.0
    assert profanity_logit.reward_from_prob(0.5) == pytest.approx(0.0)
    assert profanity_logit.reward_from_prob(0.1) == pytest.approx(math.log(9))
    # on real texts the logit reward orders them exactly as 1 - p does
    texts = [FRIENDLY, INSULT, "that was a damn good game", "I hate mondays", "nice weather"]
    by_prob = sorted(range(5), key=lambda i: profanity.score(texts, texts)[i])
    by_logit = sorted(range(5), key=lambda i: profanity_logit.score(texts, texts)[i])
    assert by_prob == by_logit


def test_profanity_rejects_unknown_mode():
    with pytest.raises(TetherError, match="mode"):
        ProfanityReward("sigmoid")


# --- HateSonar ------------------------------------------------------------------------------

needs_locale = pytest.mark.skipif(
    not locale_available(),
    reason=f"the en_US.UTF-8 locale is not installed (HateSonar needs it); as root: {LOCALE_FIX}",
)


@needs_locale
def test_hatesonar_insult_more_toxic_than_friendly():
    judge = HateSonarJudge()
    tox = judge.toxicity([FRIENDLY, INSULT])
    assert len(tox) == 2 and all(0.0 <= t <= 1.0 for t in tox)
    assert tox[1] > tox[0]
    assert checked_scores(judge, ["p", "p"], [FRIENDLY, INSULT]) == pytest.approx(
        [1 - t for t in tox]
    )
    probs = judge.class_probs([INSULT])[0]
    assert set(probs) == {"hate_speech", "offensive_language", "neither"}
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert judge.toxicity([]) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LOCPATH is glibc's")
def test_hatesonar_without_locale_says_how_to_fix():
    # LOCPATH pointing nowhere hides every installed locale from glibc: a system without it
    code = (
        "from tether.errors import TetherError\n"
        "from tether.rewards.hatesonar import HateSonarJudge\n"
        "try:\n    HateSonarJudge()\nexcept TetherError as e:\n    print(e)\n"
    )
    env = {**os.environ, "LOCPATH": "/nonexistent-tether-test"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "en_US.UTF-8 locale" in proc.stdout and "locale-gen" in proc.stdout
    assert proc.stderr == ""


# --- chit-chat ------------------------------------------------------------------------------


def test_render_dialogue_maps_speakers_and_cuts_at_turn_boundaries():
    def turn(sender, *texts):
        return [{"text": t, "sender": sender} for t in texts]

    messages = [
        turn("zz", "hello", "  there "),
        turn("aa", "hi"),
        turn("zz", "   "),  # an empty turn vanishes; aa's turns on either side merge
        turn("aa", "how are you?"),
        turn("zz", "fine " * 40),
    ]
    full, kept = render_dialogue(messages, 10_000)
    assert kept == 3
    assert full.splitlines()[:2] == ["#Person1#: hello there", "#Person2#: hi how are you?"]
    cut, kept = render_dialogue(messages, 60)
    assert kept == 2 and cut == "#Person1#: hello there\n#Person2#: hi how are you?"
    assert render_dialogue(messages, 10) == ("", 0)


def test_chitchat_split_is_deterministic_and_disjoint():
    assert split_bucket("a07edb12-6b91-4138-b11e-02421888d699") == pytest.approx(0.2400571945403862)
    train = load_chitchat(split="train")
    heldout = load_chitchat(split="heldout")
    everything = load_chitchat(split="all")
    assert load_chitchat(split="heldout") == heldout
    assert not {r.prompt for r in train} & {r.prompt for r in heldout}
    assert len(train) + len(heldout) == len(everything) > 3000
    assert 0.16 < len(heldout) / len(everything) < 0.24
    half = load_chitchat(split="heldout", heldout_fraction=0.5)
    assert 0.45 < len(half) / len(everything) < 0.55
    # a conversation's split does not depend on the cut: held-out at 700 stays held-out at 400
    ids_700 = {cid for cid, _ in load_chitchat_dialogues(700) if split_bucket(cid) < 0.2}
    ids_400 = {cid for cid, _ in load_chitchat_dialogues(400) if split_bucket(cid) < 0.2}
    assert ids_400 <= ids_700


@pytest.mark.parametrize("max_chars", [700, 250])
def test_chitchat_prompts_use_template_and_respect_max_chars(max_chars):
    records = load_chitchat(max_chars=max_chars, split="all")
    assert all(r.reference is None for r in records)
    for r in records:
        dialogue = dialogue_of(r)
        assert dialogue.startswith("#Person1#: ") and "\n#Person2#: " in dialogue
        assert len(dialogue) <= max_chars


def test_chitchat_toxic_pool_scores_higher(profanity):
    everything = load_chitchat(split="all")
    pool = load_chitchat(split="all", pool="toxic", toxic_top=300)
    assert len(pool) == 300
    assert load_chitchat(split="all", pool="toxic", toxic_top=300) == pool
    overall = score_dialogues([dialogue_of(r) for r in everything], profanity.offensive_prob)
    toxic = score_dialogues([dialogue_of(r) for r in pool], profanity.offensive_prob)
    assert sum(toxic) / len(toxic) > 2 * sum(overall) / len(overall)
    assert min(toxic) >= sorted(overall)[-300] - 1e-12
    train = load_chitchat(pool="toxic", toxic_top=300)
    heldout = load_chitchat(pool="toxic", toxic_top=300, split="heldout")
    assert len(train) + len(heldout) == 300 and not set(train) & set(heldout)
    # the rest: every dialogue the pool left out, for the second held-out evaluation
    rest = load_chitchat(split="all", pool="rest", toxic_top=300)
    assert not set(rest) & set(pool) and len(rest) + len(pool) == len(everything)
    assert load_prompts("chitchat:rest", "heldout") == load_chitchat(pool="rest", split="heldout")


def test_chitchat_custom_scorer_and_threshold():
    def shouting(texts):
        return [sum(c.isupper() for c in t) / max(len(t), 1) for t in texts]

    pool = load_chitchat(
        split="all", pool="toxic", toxic_top=None, toxic_min_score=0.3, scorer=shouting
    )
    assert pool and all(shouting([dialogue_of(r)])[0] >= 0.3 for r in pool)


def test_chitchat_bad_arguments_raise_tether_errors():
    with pytest.raises(TetherError, match="split"):
        load_chitchat(split="test")
    with pytest.raises(TetherError, match="pool"):
        load_chitchat(pool="nasty")
    with pytest.raises(TetherError, match="heldout_fraction"):
        load_chitchat(heldout_fraction=1.0)
    with pytest.raises(TetherError, match="toxic_top or toxic_min_score"):
        load_chitchat(pool="toxic", toxic_top=None)
    with pytest.raises(TetherError, match="2 scores for"):
        load_chitchat(pool="toxic", scorer=lambda texts: [0.0, 1.0])
    with pytest.raises(TetherError, match="nan"):
        load_chitchat(pool="toxic", scorer=lambda texts: [float("nan")] * len(texts))
    with pytest.raises(TetherError, match="max_chars"):
        load_chitchat(max_chars=0)


def test_chitchat_records_carry_their_dialogue_as_source():
    records = load_chitchat(split="heldout")[:20]
    for r in records:
        assert r.source and r.source.startswith("#Person1#:") and dialogue_of(r) == r.source
