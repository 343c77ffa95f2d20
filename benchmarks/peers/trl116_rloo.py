"""TRL 1.16's RLOOTrainer on tether's benchmark shape; prints one JSON line at the end.

Run by benchmarks/compare_trl.py with .bench/trl116/bin/python, against tether's --advantage rloo
(the same estimator: the whole completion as one action, its k1 sequence KL in the reward with
beta = --kl-coef, each completion's baseline the mean of its --group-size - 1 siblings').
batch_size/group_size prompts x group_size generations = batch_size completions per "step", and
like tether's mini-batches the step is cut into batch_size/mini_batch_size optimizer steps
(steps_per_generation), so one tether step = one generation round here. Each round also pays
RLOO's two no-grad passes (old and reference log-probs, the reference with the adapter off).
"""

from __future__ import annotations

import tempfile

from common import lora_config, parse_args, report
from trl import RLOOConfig, RLOOTrainer
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
    model, tokenizer = load_model(args.model)
    timer = RoundTimer(steps_per_round)
    with tempfile.TemporaryDirectory() as out:
        config = RLOOConfig(**shared_config(args, out, steps_per_round))
        trainer = RLOOTrainer(
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
