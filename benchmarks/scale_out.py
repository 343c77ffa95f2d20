"""One process against two on the same global batch: DDP and FSDP2, seconds and memory.

    python benchmarks/scale_out.py                        # SmolLM2, 16 completions a step, 48 tokens
    python benchmarks/scale_out.py --policy DIR --batch-size 8 --max-new-tokens 24

Three configurations, each in fresh processes, one after the other, each training `--steps` PPO
steps of `train()` (the first a warm-up) on the same global batch of `--batch-size` completions:

- `1 process`: plain `python`, torch's default threads;
- `DDP x2`: `accelerate launch --config_file configs/accelerate/ddp.yaml`, `--batch-size / 2`
  completions per process, one thread each (OMP_NUM_THREADS=1);
- `FSDP2 x2`: the same with configs/accelerate/fsdp2.yaml.

Per process it reports the bytes of base weights it holds at rest (its shards under FSDP2), its
RSS once the policy is built (and sharded) with the allocator's free memory handed back, its peak
RSS over the PPO steps alone (the kernel's high-water mark reset after the build, through
/proc/self/clear_refs), its peak RSS over the whole process (model loading included: every
process loads the whole model before sharding it), and the median seconds per step and of
generation. On CPU processes talk over gloo; read the figures as this machine's, not a GPU's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "examples" / "prompts.jsonl"
CONFIGS = {"DDP x2": "ddp.yaml", "FSDP2 x2": "fsdp2.yaml"}
SHAPE = ("policy", "batch_size", "mini_batch_size", "max_new_tokens", "lora_r", "steps")


def _status_kb(key: str) -> int:
    """A memory figure of this process from /proc/self/status, in kB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def worker(args: argparse.Namespace) -> None:
    """One process of one configuration: build, measure, train, write its figures as JSON."""
    import torch

    from tether import distributed
    from tether.config import TrainConfig
    from tether.state import release_freed_memory
    from tether.trainer import build_policy, train

    n = distributed.world_size()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig.from_flat(
            policy=args.policy,
            reward=f"python:{ROOT / 'examples' / 'rewards.py'}:positive_words",
            prompts=f"jsonl:{PROMPTS}",
            out=str(Path(tmp) / "run"),
            steps=args.steps,
            batch_size=args.batch_size // n,
            mini_batch_size=args.mini_batch_size // n,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.max_new_tokens,  # every completion the same length: runs compare
            lora_r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            judge_every=0,
            save_every=0,
            progress=False,
        )
        torch.manual_seed(0)
        policy = build_policy(cfg)
        release_freed_memory()
        base = [p for p in policy.model.parameters() if not p.requires_grad]
        base_bytes = sum(distributed.local(p).numel() * p.element_size() for p in base)
        built_rss = _status_kb("VmRSS")
        peak_load = max(_status_kb("VmHWM"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM: the peak from here on is the steps' alone
        rows = train(cfg, policy=policy).metrics[1:]  # step 0 is the warm-up
        figures = {
            "engine": policy.engine,
            "processes": n,
            "threads": torch.get_num_threads(),
            "batch_per_process": cfg.rl.batch_size,
            "base_weights_mb": base_bytes / 2**20,
            "rss_built_mb": built_rss / 1024,
            "peak_rss_steps_mb": _status_kb("VmHWM") / 1024,
            "peak_rss_mb": max(peak_load, _status_kb("VmHWM")) / 1024,
            "step_s": statistics.median(r["step_seconds"] for r in rows),
            "gen_s": statistics.median(r["gen_seconds"] for r in rows),
            "update_s": statistics.median(r["update_seconds"] for r in rows),
        }
    Path(args.worker_out, f"rank{distributed.rank()}.json").write_text(json.dumps(figures))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, args: argparse.Namespace) -> list[dict]:
    """One configuration in fresh processes; each process's figures, in rank order."""
    with tempfile.TemporaryDirectory() as out:
        argv = [__file__, "--worker-out", out]
        argv += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in SHAPE]
        env = {**os.environ, "TQDM_DISABLE": "1"}
        if name == "1 process":
            cmd = [sys.executable, *argv]
        else:
            accelerate = str(Path(sys.executable).parent / "accelerate")
            config = ROOT / "configs" / "accelerate" / CONFIGS[name]
            cmd = [accelerate, "launch", "--config_file", str(config), "--num_processes", "2"]
            cmd += ["--main_process_port", str(_free_port()), *argv]
            env["OMP_NUM_THREADS"] = "1"
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        files = sorted(Path(out).glob("rank*.json"))
        return [json.loads(f.read_text()) for f in files]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--policy", default="smollm2")
    parser.add_argument("--batch-size", type=int, default=16, help="global: all processes")
    parser.add_argument("--mini-batch-size", type=int, default=4, help="global: all processes")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="including one warm-up step")
    parser.add_argument(
        "--configs",
        default="1 process,DDP x2,FSDP2 x2",
        help="comma-separated subset of: 1 process, DDP x2, FSDP2 x2",
    )
    parser.add_argument("--worker-out", help="(internal) run one process, write JSON there")
    parser.add_argument("--json", action="store_true", help="print every figure as JSON too")
    args = parser.parse_args()
    if args.worker_out:
        worker(args)
        return

    names = [c.strip() for c in args.configs.split(",")]
    results = {name: run(name, args) for name in names}
    print(
        f"policy {args.policy}  global batch {args.batch_size} (mini-batch {args.mini_batch_size})"
        f"  new tokens {args.max_new_tokens}  LoRA r{args.lora_r}  steps {args.steps} (median of "
        f"{args.steps - 1} after 1 warm-up)"
    )
    head = f"{'configuration':<13} {'rank':>4} {'threads':>7} {'base weights MB':>15}"
    head += f" {'RSS built MB':>12} {'peak RSS steps MB':>17} {'peak RSS MB':>11}"
    print(head + f" {'s/step':>7} {'gen s':>6} {'update s':>8}")
    for name, ranks in results.items():
        for r, fig in enumerate(ranks):
            print(
                f"{name:<13} {r:>4} {fig['threads']:>7} {fig['base_weights_mb']:>15.0f} "
                f"{fig['rss_built_mb']:>12.0f} {fig['peak_rss_steps_mb']:>17.0f} "
                f"{fig['peak_rss_mb']:>11.0f} {fig['step_s']:>7.2f} {fig['gen_s']:>6.2f} "
                f"{fig['update_s']:>8.2f}"
            )
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
