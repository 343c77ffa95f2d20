"""What the peer scripts share: arguments, prompts, the reward, and the JSON line they print.

The peers run in their own virtual environments (.bench/trl011, .bench/trl116), so this module
imports nothing beyond the standard library and torch, and never imports tether.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
from importlib.metadata import version

import torch


def parse_args(doc: str) -> argparse.Namespace:
    """The shape of one run; benchmarks/compare_trl.py passes the same values to every tool."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--model", required=True, help="directory with config.json and weights")
    parser.add_argument("--prompts", required=True, help='jsonl file, one {"prompt": ...} a line')
    parser.add_argument("--steps", type=int, default=5, help="including one warm-up step")
    parser.add_argument("--batch-size", type=int, default=16, help="completions per step")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="exactly this many")
    parser.add_argument("--mini-batch-size", type=int, default=4)
    parser.add_argument("--lora-r", type=int, default=16, help="lora_alpha is 2 * r")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument(
        "--group-size",
        type=int,
        default=4,
        help="completions per prompt (RLOO, GRPO: num_generations; PPO samples one a prompt)",
    )
    parser.add_argument(
        "--kl-coef", type=float, default=0.05, help="KL coefficient beta (tether's default kl_coef)"
    )
    # benchmarks/gpu_step.py runs the GRPO peer on a GPU with a bf16 base; the CPU comparison
    # (compare_trl.py) keeps these defaults
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    return parser.parse_args()


def lora_config(r: int):
    """LoRA as tether's benchmark uses it: q/v projections, alpha = 2r, no dropout. peft is
    imported here, not at the top: each peer venv has its own peft version."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_prompts(path: str) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def e_fraction(text: str) -> float:
    """The reward: the share of the letter 'e'. Costs nothing, so the engine is what is timed."""
    return text.count("e") / max(len(text), 1)


def report(step_s: list[float], gen_s: list[float], response_lens: list[int], batch: int) -> None:
    """Print the one JSON line compare_trl.py reads; the first step is the warm-up and dropped."""
    step = statistics.median(step_s[1:])
    gpu = (
        {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else {}
    )
    print(
        json.dumps(
            {
                **gpu,
                "step_s": step,
                "gen_s": statistics.median(gen_s[1:]),
                "samples_per_s": batch / step,
                # Linux reports ru_maxrss in KiB
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "response_len": statistics.mean(response_lens),
                "threads": torch.get_num_threads(),
                "versions": {
                    name: version(name) for name in ("trl", "transformers", "peft", "torch")
                },
            }
        ),
        flush=True,
    )
