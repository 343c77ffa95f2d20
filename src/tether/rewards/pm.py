"""A trained preference (reward) model as a reward: `pm:DIR`.

DIR is what `tether train-rm` (or `tether cai train-pm`) writes: a PEFT adapter on a sequence
classifier with one output (LoRA + the score head) and `tether_pm.json`, which names the base
model. The reward is the model's scalar output on prompt + completion, the Bradley-Terry logit:
differences between two completions of one prompt are log-odds of preferring one.

Unlike the other rewards, a preference model reads the prompt too: whether an answer is helpful
or harmful depends on what was asked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from tether.errors import TetherError
from tether.models import load_config, merge_adapter, resolve_device, resolve_model_path

PM_INFO = "tether_pm.json"
DEFAULT_MAX_LENGTH = 256


def pm_text(tokenizer: Any, prompt: str, completion: str) -> str:
    """The text a preference model scores: one user turn and one assistant turn, in the chat
    template when the tokenizer has one (the form an instruct model knows), else plain text."""
    if getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": completion},
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return f"Human: {prompt}\n\nAssistant: {completion}"


def load_scorer(base: str, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The base model with a fresh one-output score head, and its tokenizer (right padding,
    left truncation: the end of the answer is what a preference is about)."""
    path = resolve_model_path(base)
    load_config(path, base, "preference model base")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized" is the point here
    try:
        # safetensors only and no model-shipped code, as for the policy (models.load_model)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, use_safetensors=True, trust_remote_code=False
        )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise TetherError(
            f"cannot load {base!r} as a sequence classifier: {str(e).splitlines()[0]}"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # the classifier pools the last non-pad token, which it finds through config.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"
    return model.to(device), tokenizer


def score_texts(
    model: torch.nn.Module, tokenizer: Any, texts: list[str], max_length: int
) -> torch.Tensor:
    """(n,) scalar outputs of a one-output classifier on `texts`, in one padded batch."""
    device = next(model.parameters()).device
    enc = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    ).to(device)
    return model(**enc).logits[:, 0].float()


class PreferenceModelReward:
    """Reward = a trained preference model's scalar score of (prompt, completion)."""

    def __init__(
        self, directory: str, device: str | torch.device = "cpu", batch_size: int = 16
    ) -> None:

        info_path = Path(directory) / PM_INFO
        if not info_path.is_file():
            raise TetherError(
                f"pm:{directory}: no {PM_INFO} there (expected a directory written by "
                "`tether train-rm` or `tether cai train-pm`)"
            )
        info = json.loads(info_path.read_text())
        self.name = f"pm:{directory}"
        self.batch_size = batch_size
        self.max_length = int(info.get("max_length", DEFAULT_MAX_LENGTH))
        self.device = resolve_device(device) if isinstance(device, str) else device
        base, self.tokenizer = load_scorer(info["base"], self.device)
        # merged: scoring runs plain layers, no LoRA matmuls beside them
        self.model = merge_adapter(base, directory, what="preference model")
        self.model.eval()

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        texts = [pm_text(self.tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            chunk = texts[i : i + self.batch_size]
            out.extend(score_texts(self.model, self.tokenizer, chunk, self.max_length).tolist())
        return out
