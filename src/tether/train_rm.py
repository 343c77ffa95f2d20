"""Train a preference (reward) model from comparison pairs: `tether train-rm`.

Each line of the pairs file is `{"prompt", "chosen", "rejected"}`, optionally with a soft
`"label"` in [0, 1], the probability that `chosen` is the better answer (1 when absent). The
model is the base LM as a one-output sequence classifier with LoRA on its attention and a fresh
score head, trained with the Bradley-Terry loss (`ppo.preference_loss`).

Why a small loop of our own and not TRL's RewardTrainer: RewardTrainer (TRL 1.16) takes hard
pairs only, with an optional additive margin; AI feedback gives *soft* labels (a normalised
probability, 0.4-0.6 with chain of thought), and its loss is the cross-entropy against that
probability. The loop is ~30 lines; the loss is the tested pure function.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, TaskType, get_peft_model
from tqdm.auto import tqdm

from tether import ppo
from tether.config import RewardModelConfig
from tether.data import jsonl_objects, text_bucket
from tether.errors import TetherError
from tether.models import resolve_device
from tether.options import config_to_yaml
from tether.policy import default_lora_targets
from tether.rewards.pm import PM_INFO, load_scorer, pm_text, score_texts
from tether.rundir import atomic_dir


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: str
    rejected: str
    label: float = 1.0  # P(chosen is better)


@dataclass
class RewardModelResult:
    out: Path
    n_train: int
    n_heldout: int
    heldout_accuracy_before: float | None  # None: no held-out pair with a clear preference
    heldout_accuracy: float | None
    train_accuracy: float | None
    losses: list[float]  # mean loss per epoch


def read_pairs(path: str) -> list[Pair]:
    """Comparison pairs from JSONL; every error names the file and the line."""
    pairs = []
    for lineno, row in jsonl_objects(path, "pairs file"):
        where = f"{path}:{lineno}"
        if not isinstance(row, dict):
            raise TetherError(f'{where}: expected an object with "prompt", "chosen", "rejected"')
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(row.get(key), str):
                raise TetherError(f'{where}: expected a string "{key}" field')
        label = row.get("label", 1.0)
        if isinstance(label, bool) or not isinstance(label, int | float) or not 0 <= label <= 1:
            raise TetherError(f'{where}: "label" must be a number in [0, 1], got {label!r}')
        pairs.append(Pair(row["prompt"], row["chosen"], row["rejected"], float(label)))
    if not pairs:
        raise TetherError(f"pairs file {path} holds no pairs")
    return pairs


def split_pairs(pairs: list[Pair], heldout_fraction: float) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out), by a hash of the prompt: every pair of one prompt lands on one side.

    The hash is salted: prompt sources split by the unsalted `text_bucket` too (red-team prompts
    for CAI), and pairs made from one side of that split would otherwise all land in train."""
    bucket = {p.prompt: text_bucket("pairs:" + p.prompt) for p in pairs}
    heldout = [p for p in pairs if bucket[p.prompt] < heldout_fraction]
    train = [p for p in pairs if bucket[p.prompt] >= heldout_fraction]
    if not train:
        raise TetherError(
            f"all {len(pairs)} pairs fell into the held-out split ({heldout_fraction:.0%}); "
            "give more pairs or lower --heldout-fraction"
        )
    return train, heldout


def pair_rewards(
    model: torch.nn.Module, tokenizer: Any, pairs: list[Pair], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(b,) rewards of the chosen and of the rejected answers, in one batch of 2b texts."""
    texts = [pm_text(tokenizer, p.prompt, p.chosen) for p in pairs]
    texts += [pm_text(tokenizer, p.prompt, p.rejected) for p in pairs]
    rewards = score_texts(model, tokenizer, texts, max_length)
    return rewards[: len(pairs)], rewards[len(pairs) :]


@torch.no_grad()
def pairwise_accuracy(
    model: torch.nn.Module, tokenizer: Any, pairs: list[Pair], max_length: int, batch: int = 8
) -> float | None:
    """Share of pairs whose preferred answer (label > 0.5) scores higher; ties in the label
    (0.5) say nothing and are skipped. None when no pair has a preference."""
    clear = [p for p in pairs if p.label != 0.5]
    if not clear:
        return None
    correct = 0
    for i in range(0, len(clear), batch):
        chunk = clear[i : i + batch]
        r_c, r_r = pair_rewards(model, tokenizer, chunk, max_length)
        prefers_chosen = torch.tensor([p.label > 0.5 for p in chunk], device=r_c.device)
        correct += int(((r_c > r_r) == prefers_chosen).sum())
    return correct / len(clear)


def train_reward_model(cfg: RewardModelConfig) -> RewardModelResult:
    """Train, measure held-out pairwise accuracy before and after, save `pm:`-loadable DIR."""
    train_pairs, heldout = split_pairs(read_pairs(cfg.pairs), cfg.heldout_fraction)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    base, tokenizer = load_scorer(cfg.base, device)
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,  # PEFT then also trains and saves the score head
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        target_modules=default_lora_targets(base),
    )
    with warnings.catch_warnings():  # peft 0.21 calls a transformers 5 deprecated alias
        warnings.filterwarnings("ignore", category=FutureWarning)
        model = get_peft_model(base, lora)
    model.eval()  # no dropout: the loss is a deterministic function of the weights
    acc_before = pairwise_accuracy(model, tokenizer, heldout, cfg.max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    order = torch.Generator().manual_seed(cfg.seed)
    n_batches = math.ceil(len(train_pairs) / cfg.batch_size)
    bar = tqdm(
        total=cfg.epochs * n_batches,
        desc="reward model",
        unit="batch",
        disable=not cfg.progress,
        file=sys.stderr,
    )
    losses = []
    for _epoch in range(cfg.epochs):
        total = 0.0
        for idx in torch.randperm(len(train_pairs), generator=order).split(cfg.batch_size):
            batch = [train_pairs[i] for i in idx.tolist()]
            r_c, r_r = pair_rewards(model, tokenizer, batch, cfg.max_length)
            labels = torch.tensor([p.label for p in batch], device=r_c.device)
            loss = ppo.preference_loss(r_c, r_r, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            total += loss.item() * len(batch)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        losses.append(total / len(train_pairs))
    bar.close()
    result = RewardModelResult(
        Path(cfg.out),
        len(train_pairs),
        len(heldout),
        acc_before,
        pairwise_accuracy(model, tokenizer, heldout, cfg.max_length),
        pairwise_accuracy(model, tokenizer, train_pairs, cfg.max_length),
        losses,
    )
    # a local base is recorded as an absolute path: pm:DIR must load from any working directory
    base_dir = Path(cfg.base)
    info = {
        "base": str(base_dir.resolve()) if base_dir.is_dir() else cfg.base,
        "max_length": cfg.max_length,
        "n_train": result.n_train,
        "n_heldout": result.n_heldout,
        "heldout_accuracy_before": result.heldout_accuracy_before,
        "heldout_accuracy": result.heldout_accuracy,
        "train_accuracy": result.train_accuracy,
        "epoch_losses": losses,
    }

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "config.yaml").write_text(config_to_yaml(cfg))
        (tmp / PM_INFO).write_text(json.dumps(info, indent=2))

    atomic_dir(Path(cfg.out), fill)
    return result
