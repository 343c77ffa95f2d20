"""Multi-turn generation and multiple-choice probabilities for the CAI stages.

The PPO policy (policy.py) answers single prompts; critique and revision need whole
conversations (prompt, answer, critique request, critique, revision request), and AI feedback
needs next-token probabilities of option letters. Both live here, for causal and seq2seq models.
Conversations use the tokenizer's chat template when it has one (SmolLM2-Instruct does), plain
"Human: / Assistant:" text otherwise.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from tqdm.auto import tqdm

from tether import fastpath
from tether.errors import TetherError
from tether.models import LoadedModel
from tether.rollout import SamplingParams, step_seed

Message = dict[str, str]  # {"role": "user" | "assistant", "content": ...}


class ChatModel:
    """A loaded LM that continues conversations and answers multiple-choice questions.

    `fast_path`: as the policy's (tether.fastpath); None: on unless $TETHER_FAST_PATH is 0."""

    def __init__(self, loaded: LoadedModel, fast_path: bool | None = None) -> None:
        self.model = loaded.model.eval()
        self.fast_path = fastpath.enabled(fast_path)
        if self.fast_path:
            fastpath.use_onednn_linears(self.model)
        self.tokenizer = loaded.tokenizer
        self.is_encoder_decoder = loaded.is_encoder_decoder
        self.use_template = not self.is_encoder_decoder and bool(self.tokenizer.chat_template)
        eos = self.model.generation_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        self.eos_token_ids: list[int] = [eos] if isinstance(eos, int) else list(eos)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def render(self, messages: list[Message], answer_prefix: str = "") -> str:
        """The text the model continues: the conversation, then the start of the assistant's
        turn, then `answer_prefix` (words put in the assistant's mouth)."""
        if self.use_template:
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        else:
            names = {"user": "Human", "assistant": "Assistant"}
            turns = [f"{names[m['role']]}: {m['content']}" for m in messages]
            text = "\n\n".join(turns) + "\n\nAssistant:"
            answer_prefix = " " + answer_prefix if answer_prefix else ""
        return text + answer_prefix

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        # causal: left padding so every row continues from the same right edge
        self.tokenizer.padding_side = "right" if self.is_encoder_decoder else "left"
        enc = self.tokenizer(
            texts, add_special_tokens=not self.use_template, padding=True, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in enc.items()}

    @torch.no_grad()
    def generate(
        self,
        texts: list[str],
        max_new_tokens: int,
        temperature: float,
        seed: int,
        batch_size: int = 8,
        desc: str = "generate",
        progress: bool = False,
    ) -> list[str]:
        """Sample one continuation of each rendered text. Batch i is seeded from (seed, i), so a
        rerun, or another model on the same texts, draws from the same random stream."""
        out: list[str] = []
        chunks = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
        for i, chunk in enumerate(
            tqdm(chunks, desc=desc, unit="batch", disable=not progress, file=sys.stderr)
        ):
            torch.manual_seed(step_seed(seed, i))
            enc = self._encode(chunk)
            # the policy's own sampling path (tether.fastpath), so CAI samples as fast as PPO
            sampled = fastpath.sample(
                self.model,
                enc["input_ids"],
                enc["attention_mask"],
                SamplingParams(max_new_tokens, 0, temperature),
                temperature,
                self.eos_token_ids,
                self.tokenizer.pad_token_id,
                fast=self.fast_path,
            )
            new = sampled.response_ids
            out.extend(
                t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)
            )
        return out

    @torch.no_grad()
    def option_probs(
        self, texts: list[str], options: tuple[str, ...], batch_size: int = 8
    ) -> torch.Tensor:
        """(n, k) probabilities of each option letter as the next token after each text,
        normalised over the k options only (the paper's "normalised probabilities")."""
        ids = option_token_ids(self.tokenizer, options)
        rows = []
        for i in range(0, len(texts), batch_size):
            enc = self._encode(texts[i : i + batch_size])
            if self.is_encoder_decoder:
                start = self.model.config.decoder_start_token_id
                dec = torch.full((enc["input_ids"].shape[0], 1), start, device=self.device)
                logits = self.model(**enc, decoder_input_ids=dec).logits[:, 0]
            else:
                logits = self.model(**enc).logits[:, -1]  # left padding: last = next token
            rows.append(torch.softmax(logits[:, ids].float(), dim=-1))
        return torch.cat(rows)


def option_token_ids(tokenizer: Any, options: tuple[str, ...]) -> list[int]:
    """One token id per option letter; refuses letters the tokenizer cannot tell apart."""
    ids = []
    for opt in options:
        enc = tokenizer.encode(opt, add_special_tokens=False)
        if len(enc) != 1 or enc[0] == tokenizer.unk_token_id:
            raise TetherError(f"option {opt!r} is not a single known token for this tokenizer")
        ids.append(enc[0])
    if len(set(ids)) != len(ids):
        raise TetherError(f"options {options} map to the same token")
    return ids


def option_letters(tokenizer: Any) -> tuple[str, str]:
    """("A", "B") when the tokenizer has them as single tokens, else ("a", "b") (tokenizers
    without upper case, like the character-level test models)."""
    for letters in (("A", "B"), ("a", "b")):
        try:
            option_token_ids(tokenizer, letters)
            return letters
        except TetherError:
            continue
    raise TetherError("the feedback model's tokenizer has neither A/B nor a/b as single tokens")
