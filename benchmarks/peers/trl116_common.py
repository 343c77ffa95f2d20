"""What the TRL 1.16 peers (trl116_rloo.py, trl116_grpo.py) share: the data, the model, the
config fields they set alike, the round timer and the generation timer. Imported only in the
.bench/trl116 venv.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import e_fraction, load_prompts
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback


class RoundTimer(TrainerCallback):
    """Wall-clock time of each generation round: from the previous round's last optimizer step
    (or the start of training) to this round's last one."""

    def __init__(self, steps_per_round: int) -> None:
        self.steps_per_round = steps_per_round
        self.marks: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.marks.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.steps_per_round == 0:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


def reward(completions: list, **kwargs) -> list[float]:
    """TRL 1.x's reward-function signature; conversational completions are lists of messages."""
    return [e_fraction(c[0]["content"] if isinstance(c, list) else c) for c in completions]


def conversational_dataset(path: str) -> Dataset:
    """The prompts in conversational form: the trainer applies the chat template with
    add_generation_prompt=True, as tether does."""
    return Dataset.from_list(
        [{"prompt": [{"role": "user", "content": p}]} for p in load_prompts(path)]
    )


def load_model(path: str, dtype: str = "float32"):
    return (
        AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)),
        AutoTokenizer.from_pretrained(path),
    )


def shared_config(args: argparse.Namespace, out: str, steps_per_round: int) -> dict:
    """The RLOOConfig / GRPOConfig fields both peers set alike: the shape, sampling, schedule."""
    return dict(
        output_dir=out,
        use_cpu=args.device == "cpu",
        # TRL's configs default to bf16 and gradient checkpointing; tether uses fp32 and no
        # checkpointing on the CPU, a bf16 base on a GPU (gpu_step.py: --dtype bfloat16).
        # transformers 5 calls checkpointing activation_checkpointing.
        bf16=args.dtype == "bfloat16",
        activation_checkpointing=False,
        per_device_train_batch_size=args.mini_batch_size,  # one optimizer step = one mini-batch
        gradient_accumulation_steps=1,
        steps_per_generation=steps_per_round,  # one generation round = batch_size completions
        num_generations=args.group_size,
        num_iterations=1,  # one epoch over the round's completions, as --ppo-epochs=1
        beta=args.kl_coef,  # > 0, so the reference pass (adapter off) happens, as in tether
        max_completion_length=args.max_new_tokens,
        generation_kwargs={"min_new_tokens": args.max_new_tokens},  # min = max
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        learning_rate=args.lr,
        lr_scheduler_type="constant",  # as tether and TRL 0.11's PPO
        max_steps=args.steps * steps_per_round,
        shuffle_dataset=False,  # the prompts in file order, cycled
        seed=0,
        report_to="none",
        save_strategy="no",
        logging_steps=steps_per_round,
        disable_tqdm=True,
    )


def check_shape(args: argparse.Namespace) -> int:
    """Optimizer steps per generation round; the round must hold whole prompt groups."""
    if args.batch_size % args.mini_batch_size or args.batch_size % args.group_size:
        raise SystemExit(
            f"--batch-size {args.batch_size} must be divisible by --mini-batch-size "
            f"{args.mini_batch_size} and --group-size {args.group_size}"
        )
    return args.batch_size // args.mini_batch_size


def time_generation(trainer) -> tuple[list[float], list[int]]:
    """Wrap the trainer's generate path (a private method in TRL 1.16) so the share spent sampling
    can be reported next to tether's. Returns the lists it fills: seconds per call and the
    completion lengths. RLOO's returns the completion ids, GRPO's (completion ids, logprobs)."""
    gen_s: list[float] = []
    lens: list[int] = []
    generate = trainer._generate_single_turn

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        out = generate(*a, **kw)
        gen_s.append(time.perf_counter() - t0)
        completion_ids = out[0] if isinstance(out, tuple) else out
        lens.extend(len(c) for c in completion_ids)
        return out

    trainer._generate_single_turn = timed_generate
    return gen_s, lens
