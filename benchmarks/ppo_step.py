"""Seconds per PPO step, generation share, samples/s and peak RSS for one model and shape.

    python benchmarks/ppo_step.py --policy smollm2 --batch-size 16 --max-new-tokens 48
    python benchmarks/ppo_step.py --reference both     # shared vs full-copy reference, side by side

Each configuration runs in its own process, so peak RSS is that configuration's alone. Every
completion is forced to exactly --max-new-tokens tokens (min = max) so runs are comparable.
The reward is a trivial Python function: this measures the engine, not a reward model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "examples" / "prompts.jsonl"


def run_one(args: argparse.Namespace) -> dict:
    """One configuration in this process; returns the figures as a dict."""
    import torch

    from tether.config import TrainConfig
    from tether.data import load_prompts
    from tether.rewards import load_reward
    from tether.trainer import TrainState, build_policy, ppo_step, sampling_params

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            policy=args.policy,
            reward=f"python:{ROOT / 'examples' / 'rewards.py'}:positive_words",
            prompts=f"jsonl:{PROMPTS}",
            out=tmp,
            steps=args.steps,
            batch_size=args.batch_size,
            mini_batch_size=args.mini_batch_size,
            ppo_epochs=args.ppo_epochs,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.max_new_tokens,
            lora_r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            reference=args.reference,
            progress=False,
            save_every=0,
        )
        rss_before_model = _peak_rss_mb()
        torch.manual_seed(0)
        policy = build_policy(cfg)
        n_weights = sum(
            p.numel() * p.element_size() for p in policy.model.base_model.model.parameters()
        )
        records = load_prompts(cfg.prompts)
        reward = load_reward(cfg.reward)
        state = TrainState.create(policy, cfg)
        rows = [
            ppo_step(policy, reward, state, records, sampling_params(cfg), cfg, step)
            for step in range(args.steps)
        ]
    timed = rows[1:]  # step 0 is the warm-up
    step_s = statistics.median(r["step_seconds"] for r in timed)
    return {
        "reference": args.reference,
        "policy": args.policy,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "threads": torch.get_num_threads(),
        "step_s": step_s,
        "gen_s": statistics.median(r["gen_seconds"] for r in timed),
        "forward_s": statistics.median(r["forward_seconds"] for r in timed),
        "update_s": statistics.median(r["update_seconds"] for r in timed),
        "score_s": statistics.median(r["score_seconds"] for r in timed),
        "gen_share": statistics.median(r["gen_seconds"] / r["step_seconds"] for r in timed),
        "samples_per_s": args.batch_size / step_s,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_before_model_mb": rss_before_model,
        "weights_mb": n_weights / 2**20,
        "response_len": statistics.mean(r["response_len_mean"] for r in rows),
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--policy", default="smollm2")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mini-batch-size", type=int, default=4)
    parser.add_argument("--ppo-epochs", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="including one warm-up step")
    parser.add_argument("--reference", choices=["shared", "full-copy", "both"], default="both")
    parser.add_argument(
        "--json", action="store_true", help="(internal) run one configuration, print JSON"
    )
    args = parser.parse_args()

    if args.json:
        print(json.dumps(run_one(args)))
        return
    modes = ["shared", "full-copy"] if args.reference == "both" else [args.reference]
    results = []
    for mode in modes:
        argv = [sys.executable, __file__, "--json", "--reference", mode] + [
            f"--{k.replace('_', '-')}={v}"
            for k, v in vars(args).items()
            if k not in ("json", "reference")
        ]
        proc = subprocess.run(
            argv, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}
        )
        if proc.returncode:
            sys.exit(f"benchmark run failed ({mode}):\n{proc.stderr[-2000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    r0 = results[0]
    print(
        f"policy {r0['policy']}  batch {r0['batch_size']}  new tokens {r0['max_new_tokens']}  "
        f"threads {r0['threads']}  steps {args.steps} (median of {args.steps - 1} after 1 warm-up)"
    )
    header = f"{'reference':<10} {'s/step':>7} {'gen s':>6} {'fwd s':>6} {'upd s':>6} {'gen %':>6} {'samples/s':>9} {'peak RSS MB':>11}"
    print(header)
    for r in results:
        print(
            f"{r['reference']:<10} {r['step_s']:>7.2f} {r['gen_s']:>6.2f} {r['forward_s']:>6.2f} {r['update_s']:>6.2f} "
            f"{100 * r['gen_share']:>5.0f}% {r['samples_per_s']:>9.2f} {r['peak_rss_mb']:>11.0f}"
        )
    if len(results) == 2:
        saved = results[1]["peak_rss_mb"] - results[0]["peak_rss_mb"]
        print(
            f"base weights {r0['weights_mb']:.0f} MB; full-copy peak RSS - shared peak RSS = {saved:.0f} MB "
            f"({saved / r0['weights_mb']:.0%} of the weights); shared/full-copy peak = "
            f"{results[0]['peak_rss_mb'] / results[1]['peak_rss_mb']:.2f}"
        )


if __name__ == "__main__":
    main()
