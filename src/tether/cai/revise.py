"""Stage 1, critique and revise: answer a red-team prompt, then K times ask the model to
critique its answer under a sampled principle and to revise it (Bai et al. 2022, sec. 3.1).

Each round starts from (prompt, current answer) rather than the whole growing conversation: a
135M model's context gets noisy fast, and the paper's point, that the revision answers the
critique of the answer it replaces, holds either way. Every step is kept in the JSONL rows.
"""

from __future__ import annotations

import random
from typing import Any

from tether.cai.chat import ChatModel, Message
from tether.cai.constitution import Principle, sample_principle


def critique_messages(prompt: str, answer: str, principle: Principle) -> list[Message]:
    """The conversation that asks for a critique: the red-team exchange, then the request."""
    return [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": f"Critique request: {principle.critique}"},
    ]


def revision_messages(
    prompt: str, answer: str, principle: Principle, critique: str
) -> list[Message]:
    """The critique conversation, the critique, then the request to revise."""
    return critique_messages(prompt, answer, principle) + [
        {"role": "assistant", "content": critique},
        {"role": "user", "content": f"Revision request: {principle.revision}"},
    ]


def revise(
    chat: ChatModel,
    prompts: list[str],
    principles: list[Principle],
    rounds: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int = 8,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Rows {prompt, initial, rounds: [{principle, critique_request, critique, revision_request,
    revision}], final}, one per prompt. An empty revision keeps the answer it should replace
    (counted in `empty_revisions`), so SL-CAI never trains on nothing."""
    rng = random.Random(seed)

    def gen(conversations: list[list[Message]], tag: str, offset: int) -> list[str]:
        texts = [chat.render(c) for c in conversations]
        return chat.generate(
            texts, max_new_tokens, temperature, seed + offset, batch_size, tag, progress
        )

    answers = gen([[{"role": "user", "content": p}] for p in prompts], "answers", 0)
    rows = [
        {"prompt": p, "initial": a, "rounds": [], "empty_revisions": 0}
        for p, a in zip(prompts, answers, strict=True)
    ]
    for k in range(rounds):
        chosen = [sample_principle(principles, rng) for _ in prompts]
        current = [r["rounds"][-1]["revision_kept"] if r["rounds"] else r["initial"] for r in rows]
        crit_conv = [
            critique_messages(p, a, c) for p, a, c in zip(prompts, current, chosen, strict=True)
        ]
        critiques = gen(crit_conv, f"critiques {k + 1}/{rounds}", 1 + 2 * k)
        rev_conv = [
            revision_messages(p, a, c, cr)
            for p, a, c, cr in zip(prompts, current, chosen, critiques, strict=True)
        ]
        revisions = gen(rev_conv, f"revisions {k + 1}/{rounds}", 2 + 2 * k)
        for row, a, c, cc, rc, cr, rv in zip(
            rows, current, chosen, crit_conv, rev_conv, critiques, revisions, strict=True
        ):
            row["empty_revisions"] += not rv
            row["rounds"].append(
                {
                    "principle": c.name,
                    "critique_request": cc[-1]["content"],
                    "critique": cr,
                    "revision_request": rc[-1]["content"],
                    "revision": rv,
                    "revision_kept": rv or a,
                }
            )
    for row in rows:
        row["final"] = row["rounds"][-1]["revision_kept"] if row["rounds"] else row["initial"]
    return rows
