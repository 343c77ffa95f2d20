"""TRL 1.16's GRPOTrainer on tether's benchmark shape; prints one JSON line at the end.

Run by benchmarks/compare_trl.py with .bench/trl116/bin/python, against tether's
--advantage grpo, the same way as trl116_rloo.py: batch_size/group_size prompts x group_size
generations (num_generations) = batch_size completions per generation round, cut into
batch_size/mini_batch_size optimizer steps (steps_per_generation), one iteration over them. The
estimator is tether's grpo: the group-relative advantage (r - mean) / (std + 1e-4) within each
prompt's group (scale_rewards="group", TRL's default), a per-token clipped ratio (epsilon 0.2,
as tether's cliprange), the k3 per-token KL to the reference added to the loss, unweighted, with
beta = --kl-coef (> 0, so the reference pass with the adapter off happens, as in tether), and a
token mean over the mini-batch (loss_type="bnpo", see below).

Per round TRL pays a no-grad pass for the reference log-probs and, since steps_per_generation
> gradient_accumulation_steps, one for the old log-probs (the policy moves between the round's
mini-batches); tether's forward phase computes both as well.
"""

from __future__ import annotations

import tempfile

from common import lora_config, parse_args, report
from trl import GRPOConfig, GRPOTrainer
from trl116_common import (
    RoundTimer,
    check_shape,
    conversational_dataset,
    load_model,
    reward,
    shared_config,
    time_generation,
)


def main() -> None:
    args = parse_args(__doc__)
    steps_per_round = check_shape(args)
    model, tokenizer = load_model(args.model, args.dtype)
    timer = RoundTimer(steps_per_round)
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            **shared_config(args, out, steps_per_round),
            # tether's token-mean: the sum over the mini-batch's valid tokens / their count. With
            # per_device_train_batch_size = the mini-batch and no gradient accumulation, "bnpo"
            # normalises by exactly that count. "dapo" (TRL's default) divides by the generation
            # round's token count / steps_per_generation, the mean over all mini-batches: the same
            # here, where every completion has --max-new-tokens tokens, but not in general.
            loss_type="bnpo",
            scale_rewards="group",  # divide by each group's std, as tether's grpo_std default
            importance_sampling_level="token",  # one ratio per token, as tether's grpo
            epsilon=0.2,  # tether's cliprange
            # the k3 KL as GRPO has it; TRL 1.16's default (True) weighs it by the ratio
            # (DeepSeek-V3.2's unbiased estimate), which tether's grpo does not
            use_bias_correction_kl=False,
            mask_truncated_completions=False,  # as tether's default
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=config,
            train_dataset=conversational_dataset(args.prompts),
            processing_class=tokenizer,
            peft_config=lora_config(args.lora_r),
            callbacks=[timer],
        )
        gen_s, lens = time_generation(trainer)
        trainer.train()
    report(timer.seconds(), gen_s, lens, args.batch_size)


if __name__ == "__main__":
    main()
