"""TRL 1.16's RLOOTrainer on tether's benchmark shape; prints one JSON line at the end.

Run by benchmarks/compare_trl.py with .bench/trl116/bin/python. TRL 1.x dropped the step-wise
PPOTrainer; RLOO is its closest on-policy trainer for a LoRA policy without a value model.
batch_size/2 prompts x 2 generations = batch_size completions per "step", and like tether's
mini-batches the step is cut into batch_size/mini_batch_size optimizer steps
(steps_per_generation), so one tether step = one generation round here. Each round also pays
RLOO's two no-grad passes (old and reference log-probs, the reference with the adapter off).
"""

from __future__ import annotations

import tempfile
import time

import torch
from common import e_fraction, load_prompts, lora_config, parse_args, report
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import RLOOConfig, RLOOTrainer


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
    """RLOO's reward-function signature; conversational completions are lists of messages."""
    return [e_fraction(c[0]["content"] if isinstance(c, list) else c) for c in completions]


def main() -> None:
    args = parse_args(__doc__)
    steps_per_round = args.batch_size // args.mini_batch_size
    # A dataset in conversational form: RLOO applies the chat template with
    # add_generation_prompt=True, as tether does.
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": p}]} for p in load_prompts(args.prompts)]
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    lora = lora_config(args.lora_r)
    timer = RoundTimer(steps_per_round)
    with tempfile.TemporaryDirectory() as out:
        config = RLOOConfig(
            output_dir=out,
            use_cpu=True,
            # RLOOConfig defaults to bf16 and gradient checkpointing; tether uses fp32 and no
            # checkpointing. transformers 5 calls checkpointing activation_checkpointing.
            bf16=False,
            activation_checkpointing=False,
            per_device_train_batch_size=args.mini_batch_size,
            gradient_accumulation_steps=1,
            steps_per_generation=steps_per_round,
            num_generations=2,
            num_iterations=1,
            max_completion_length=args.max_new_tokens,
            generation_kwargs={"min_new_tokens": args.max_new_tokens},  # min = max
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            beta=0.05,
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
        trainer = RLOOTrainer(
            model=model,
            reward_funcs=reward,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[timer],
        )
        # Generation time: wrap the trainer's generate path (a private method in TRL 1.16) so the
        # share spent sampling can be reported next to tether's.
        gen_s, lens = [], []
        generate = trainer._generate_single_turn

        def timed_generate(*a, **kw):
            t0 = time.perf_counter()
            completion_ids = generate(*a, **kw)
            gen_s.append(time.perf_counter() - t0)
            lens.extend(len(c) for c in completion_ids)
            return completion_ids

        trainer._generate_single_turn = timed_generate
        trainer.train()
    report(timer.seconds(), gen_s, lens, args.batch_size)


if __name__ == "__main__":
    main()
