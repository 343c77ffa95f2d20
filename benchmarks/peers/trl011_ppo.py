"""TRL 0.11.4's PPOTrainer (v1) on tether's benchmark shape; prints one JSON line at the end.

Run by benchmarks/compare_trl.py with .bench/trl011/bin/python. TRL v1 is the step-wise API
that tether's own loop mirrors: generate a batch, score it, call `step`. With a LoRA model the
reference is the same model with the adapter disabled (ref_model=None), as tether's "shared"
reference. A full-copy reference cannot be measured here: with PEFT, TRL 0.11 keeps a passed
ref_model but still computes the reference log-probs with the adapter disabled.
"""

from __future__ import annotations

import time

import torch
from common import e_fraction, load_prompts, lora_config, parse_args, report
from transformers import AutoTokenizer
from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer


def main() -> None:
    args = parse_args(__doc__)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    lora = lora_config(args.lora_r)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(args.model, peft_config=lora)
    config = PPOConfig(
        learning_rate=args.lr,
        batch_size=args.batch_size,
        mini_batch_size=args.mini_batch_size,
        ppo_epochs=1,
        init_kl_coef=args.kl_coef,  # --group-size does not apply: PPO samples one a prompt
        seed=0,
        log_with=None,
    )
    trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tokenizer)

    # The chat template around each prompt, as tether does; the template carries the special
    # tokens, so apply_chat_template adds none of its own.
    queries = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt"
        )[0]
        for p in load_prompts(args.prompts)
    ]
    gen_kwargs = {
        "do_sample": True,
        "top_k": 0,
        "top_p": 1.0,
        "temperature": 1.0,
        "min_new_tokens": args.max_new_tokens,  # min = max: every completion has the same length
        "max_new_tokens": args.max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
    }

    step_s, gen_s, lens = [], [], []
    for step in range(args.steps):
        batch = [
            queries[(step * args.batch_size + i) % len(queries)] for i in range(args.batch_size)
        ]
        t0 = time.perf_counter()
        responses = trainer.generate(
            batch, batch_size=args.batch_size, return_prompt=False, **gen_kwargs
        )
        t1 = time.perf_counter()
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        rewards = [torch.tensor(e_fraction(t)) for t in texts]
        trainer.step(batch, responses, rewards)
        step_s.append(time.perf_counter() - t0)
        gen_s.append(t1 - t0)
        lens.extend(len(r) for r in responses)
    report(step_s, gen_s, lens, args.batch_size)


if __name__ == "__main__":
    main()
