"""Stage 3, AI feedback: two answers per prompt, and a feedback model's multiple-choice
judgement of which better follows a sampled principle, as a soft label (Bai et al. 2022, sec. 4.1).

The label is the feedback model's probability of option (A) against (B), normalised over the two
letters. Small models favour a position; each pair is asked in both orders and the two
probabilities that the first answer is better are averaged, which cancels a constant position
bias. With chain of thought the model reasons first; the letter that follows is then nearly
certain, so its probability is clamped to [0.4, 0.6], as the paper does, to keep labels soft.
"""

from __future__ import annotations

import random
from typing import Any

from tether.cai.chat import ChatModel, option_letters
from tether.cai.constitution import Principle, sample_principle

COT_PREFIX = "Let's think step by step:"
ANSWER_PREFIX = "The answer is: ("
COT_ANSWER_PREFIX = "So the answer is: ("
COT_CLAMP = (0.4, 0.6)


def feedback_question(
    prompt: str, first: str, second: str, principle: Principle, letters: tuple[str, str]
) -> str:
    """The multiple-choice question put to the feedback model."""
    return (
        "Consider the following conversation between a human and an assistant:\n\n"
        f"Human: {prompt}\n\n"
        f"{principle.preference}\n"
        "Options:\n"
        f"({letters[0]}) {first}\n"
        f"({letters[1]}) {second}"
    )


def choice_probabilities(
    chat: ChatModel,
    questions: list[str],
    chain_of_thought: bool = False,
    max_new_tokens: int = 48,
    seed: int = 0,
    batch_size: int = 8,
) -> list[float]:
    """P(first option) for each question, normalised over the two option letters; with chain of
    thought, the reasoning is sampled first and the probability is clamped."""
    letters = option_letters(chat.tokenizer)
    if not chain_of_thought:
        texts = [chat.render([{"role": "user", "content": q}], ANSWER_PREFIX) for q in questions]
        return chat.option_probs(texts, letters, batch_size)[:, 0].tolist()
    starts = [chat.render([{"role": "user", "content": q}], COT_PREFIX) for q in questions]
    thoughts = chat.generate(starts, max_new_tokens, 1.0, seed, batch_size)
    texts = [f"{s} {t}\n{COT_ANSWER_PREFIX}" for s, t in zip(starts, thoughts, strict=True)]
    probs = chat.option_probs(texts, letters, batch_size)[:, 0]
    return probs.clamp(*COT_CLAMP).tolist()


def ai_feedback(
    policy_chat: ChatModel,
    feedback_chat: ChatModel,
    prompts: list[str],
    principles: list[Principle],
    max_new_tokens: int,
    temperature: float,
    seed: int,
    chain_of_thought: bool = False,
    batch_size: int = 8,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Pairs {prompt, chosen, rejected, label, principle, ...}: `chosen` is the first sampled
    answer and `label` the probability that it is the better one (so rows train `train-rm`
    directly; a label below 0.5 says the rejected one was better)."""
    rng = random.Random(seed)
    texts = [policy_chat.render([{"role": "user", "content": p}]) for p in prompts]
    a = policy_chat.generate(
        texts, max_new_tokens, temperature, seed, batch_size, "answers A", progress
    )
    b = policy_chat.generate(
        texts, max_new_tokens, temperature, seed + 1, batch_size, "answers B", progress
    )
    letters = option_letters(feedback_chat.tokenizer)
    chosen = [sample_principle(principles, rng) for _ in prompts]
    forward = [
        feedback_question(p, x, y, c, letters)
        for p, x, y, c in zip(prompts, a, b, chosen, strict=True)
    ]
    swapped = [
        feedback_question(p, y, x, c, letters)
        for p, x, y, c in zip(prompts, a, b, chosen, strict=True)
    ]
    p_fwd = choice_probabilities(
        feedback_chat, forward, chain_of_thought, max_new_tokens, seed + 2, batch_size
    )
    p_swp = choice_probabilities(
        feedback_chat, swapped, chain_of_thought, max_new_tokens, seed + 3, batch_size
    )
    return [
        {
            "prompt": p,
            "chosen": x,
            "rejected": y,
            # P(x better) asked as (A)=x, and as (B)=x: 1 - P(A = y)
            "label": 0.5 * (pf + (1.0 - ps)),
            "principle": c.name,
            "p_first_forward": pf,
            "p_first_swapped": ps,
        }
        for p, x, y, c, pf, ps in zip(prompts, a, b, chosen, p_fwd, p_swp, strict=True)
    ]
