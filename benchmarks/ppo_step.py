"""Where a PPO step's time goes, for one model and shape, and how it scales.

    python benchmarks/ppo_step.py                   # batch 16, 48 tokens: phases, FLOP/s, memory
    python benchmarks/ppo_step.py --scaling --plot benchmarks/results/scaling.png
    python benchmarks/ppo_step.py --memory          # what the peak RSS is made of
    python benchmarks/ppo_step.py --advantage grpo --group-size 4   # a critic-free estimator
    python benchmarks/ppo_step.py --advantage grpo --side-by-side "" "--policy-loss sapo" \
        --rounds 2 --save benchmarks/results/policy_losses_step.json    # options, interleaved

The default run measures the shared reference (adapter disabled) and a full-copy reference
side by side, each in its own process so peak RSS is that configuration's alone, and prints a
per-phase breakdown of the shared run: generate, score, reference forward, advantages, update,
the guard (one probe of --probe-prompts prompts, amortised over --judge-every steps) and I/O
(one checkpoint amortised over --save-every steps, plus the metrics line), each with the useful
FLOPs it did and the FLOP/s achieved against this machine's measured fp32 matmul throughput.
`--scaling` runs batch 4/16/64 at 48 new tokens and 24/48/96 new tokens at batch 16.
`--memory` splits the shared run's peak RSS into libraries, weights, what autograd keeps for one
update micro-batch and what glibc's allocator holds on to, and measures two ways to lower it.
`--side-by-side` times variants of one configuration (each a string of this script's options
added to the rest), round after round so that a machine's drift falls on all of them alike, and
reports each one's median step and update phase against the first.

Every completion is forced to exactly --max-new-tokens tokens (min = max) so runs compare. The
reward is a trivial Python function: this measures the engine, not a reward model. --advantage,
--group-size, --kl-coef, --kl-penalty and --kl-estimator go into the TrainConfig as they are; left out, tether's defaults
apply (PPO with GAE and a critic, one completion a prompt, kl_coef 0.05).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_io import measured_line, provenance, table

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "examples" / "prompts.jsonl"
PHASES = ["gen", "score", "forward", "advantages", "update", "guard", "io"]
# options of this script that stay in the parent process (or are passed on as bare flags)
LOCAL = {"json", "scaling", "plot", "memory", "bare", "side_by_side", "rounds", "save", "show"}
LOCAL |= {"markdown"}
SCALING = [(4, 48), (16, 48), (64, 48), (16, 24), (16, 96)]  # (batch, new tokens)


def matmul_gflops() -> float:
    """Best of 5 fp32 2048^3 matmuls: the ceiling the phases' FLOP/s are compared with."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(5))
    return 2 * 2048**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class FlopCounter:
    """Useful FLOPs of passes over real (unpadded) tokens, from the model's own shapes.

    Per token, 2 FLOPs per weight of every linear layer below the lm_head; attention 4 x context x
    (heads x head_dim) per layer (QK^T and AV); the lm_head 2 x d x V for each position whose logits
    are taken. A training pass (forward + backward) counts as 2 forwards: the frozen weights get
    no gradient, only the activations do (the LoRA matrices' own gradients are ~1% of that).
    """

    def __init__(self, model) -> None:
        import torch

        head = model.get_output_embeddings()
        self.linear = sum(
            m.weight.numel()
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head and "lora_" not in name
        )
        self.head = head.weight.numel()
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.attn = cfg.num_hidden_layers * cfg.num_attention_heads * head_dim

    def forward(self, prompt_len: int, response_len: int) -> float:
        """One causal pass over prompt + response, logits at the response positions. Generation
        does the same useful work, one token at a time."""
        n = prompt_len + response_len
        return 2 * self.linear * n + 4 * self.attn * n * (n + 1) / 2 + 2 * self.head * response_len


def decoding(policy, prompts: list[str], sampling, repeat: int = 3) -> dict:
    """Milliseconds per decoding step of `Policy.generate` beside its floor, measured here, now:
    (rollout of 49 tokens - rollout of 1 token) / 48, median of `repeat`; the floor is every
    frozen linear layer's matmul at the batch's rows, one layer at a time, with the kernel the
    step runs (`fastpath.frozen_linear`), the 30 blocks' alone and with the lm_head; and for
    comparison with torch's F.linear; and the weight bytes read per step against this machine's
    copy bandwidth (a 2 x weights-sized tensor copy)."""
    import torch

    from tether import fastpath, llama_step
    from tether.rollout import SamplingParams

    def rollout(n: int) -> float:
        fixed = SamplingParams(**{**sampling.__dict__, "max_new_tokens": n, "min_new_tokens": n})
        torch.manual_seed(0)
        return _timed(lambda: policy.generate(prompts, fixed))

    rollout(2)  # warm-up
    steps = [(rollout(49) - rollout(1)) / 48 for _ in range(repeat)]
    base = policy.model.get_base_model()
    head = base.get_output_embeddings()
    layers = fastpath.frozen_linears(base)
    xs = [torch.randn(len(prompts), m.in_features) for m in layers]

    def matmuls(which, plain: bool = False) -> float:
        def run() -> None:
            for m, x in zip(layers, xs, strict=True):
                if which(m):
                    torch.nn.functional.linear(x, m.weight) if plain else m.forward(x)

        run()
        return statistics.median(_timed(run) for _ in range(7))

    with torch.no_grad():
        blocks = matmuls(lambda m: m is not head)
        everything = matmuls(lambda m: True)
        flinear = matmuls(lambda m: True, plain=True)
    nbytes = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    big = torch.empty(nbytes // 4, dtype=torch.float32).normal_()
    out = torch.empty_like(big)
    copy_s = min(_timed(lambda: out.copy_(big)) for _ in range(5))
    return {
        "decode_ms": 1e3 * statistics.median(steps),
        "llama_step": llama_step.applies(policy.model, sharded=False),
        "floor_blocks_ms": 1e3 * blocks,
        "floor_ms": 1e3 * everything,
        "floor_flinear_ms": 1e3 * flinear,
        "decode_weight_mb": nbytes / 2**20,
        "copy_gbps": 2 * nbytes / copy_s / 1e9,  # bytes read + bytes written per second
        "bytes_floor_ms": 1e3 * copy_s / 2,  # reading the weights once at that rate
    }


def rss_mb() -> float:
    """Resident memory now (not the peak), from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def saved_activation_mb(policy, rollout) -> float:
    """What autograd keeps from one training forward over `rollout` until its backward, the
    parameters (which it also references) left out: the update's memory on top of the rest."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        policy(rollout)
    return sum(saved.values()) / 2**20


def run_one(args: argparse.Namespace) -> dict:
    """One configuration in this process; returns the figures as a dict."""
    import torch

    from tether.config import TrainConfig
    from tether.data import load_prompts
    from tether.guard import Guard, GuardSettings
    from tether.options import config_to_yaml
    from tether.rewards import load_reward
    from tether.rundir import RunDir
    from tether.state import TrainState
    from tether.trainer import batch_indices, build_policy, ppo_step, sampling_params
    from tether.update import micro_batch_size

    libraries_mb = rss_mb()  # torch, transformers, peft and tether imported, no model yet
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig.from_flat(
            policy=args.policy,
            reward=f"python:{ROOT / 'examples' / 'rewards.py'}:positive_words",
            prompts=f"jsonl:{PROMPTS}",
            out=tmp,
            steps=args.steps,
            batch_size=args.batch_size,
            mini_batch_size=args.mini_batch_size,
            ppo_epochs=args.ppo_epochs,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.max_new_tokens,
            lora_r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            reference=args.reference,
            progress=False,
            # only what was asked for, so that without these flags the run is what it always was
            **{
                k: v
                for k in (
                    "advantage",
                    "group_size",
                    "kl_coef",
                    "kl_penalty",
                    "kl_estimator",
                    "policy_loss",
                    "cliprange_high",
                    "kl_bias_correction",
                )
                if (v := getattr(args, k)) is not None
            },
        )
        torch.manual_seed(0)
        policy = build_policy(cfg)
        base = policy.model.base_model.model
        n_weights = sum(p.numel() * p.element_size() for p in base.parameters())
        records = load_prompts(cfg.task.prompts)
        reward = load_reward(cfg.task.reward)
        state = TrainState.create(policy, cfg)
        sampling = sampling_params(cfg.sampling)
        rows = [
            ppo_step(policy, reward, state, records, sampling, cfg, step)
            for step in range(args.steps)
        ]
        timed = rows[1:]  # step 0 is the warm-up
        peak_steps_mb = peak_rss_mb()  # the PPO steps alone; the guard's probe and I/O come next

        def median(key: str) -> float:
            return statistics.median(r[key] for r in timed)

        phases = {p: median(f"{p}_seconds") for p in PHASES[:5]}
        flops = FlopCounter(base)
        # batch_size completions a step: batch_size / group_size prompts, each sampled
        # group_size times (group_size is 1 for gae)
        group = cfg.rl.group_size
        prompt_lens = [
            policy.encode_prompts([records[i].prompt])[1].sum().item()
            for step in range(1, args.steps)
            for i in batch_indices(
                len(records), cfg.rl.batch_size // group, cfg.training.seed, step
            )
            for _ in range(group)
        ]
        fwd = statistics.mean(flops.forward(p, args.max_new_tokens) for p in prompt_lens)
        fwd *= cfg.rl.batch_size
        phase_flops = {"gen": fwd, "forward": fwd, "update": 2 * fwd * cfg.rl.ppo_epochs}

        extra = {}
        if args.memory:
            micro = micro_batch_size(cfg, policy.device)
            rollout, _, _ = policy.generate([r.prompt for r in records[:micro]], sampling)
            extra["saved_activation_mb"] = saved_activation_mb(policy, rollout)
        if args.reference == "shared" and not args.bare:
            # The guard's cost per step: one probe, amortised over judge_every steps.
            run = RunDir(Path(tmp) / "run")
            run.prepare(config_to_yaml(cfg), resume=False)
            settings = GuardSettings(
                judge_every=args.judge_every,
                probe_batch_size=cfg.rl.batch_size,
                probe_seed=cfg.training.seed + 4321,  # as train() does
            )
            probes = records[: args.probe_prompts]
            guard = Guard(settings, run, policy, reward, None, probes, sampling)
            extra["probe_s"] = _timed(guard.start)
            phases["guard"] = extra["probe_s"] / args.judge_every
            # I/O per step: the metrics line, and one checkpoint amortised over save_every.
            extra["metrics_line_s"] = _timed(lambda: run.append_metrics(rows[-1]))
            extra["checkpoint_s"] = _timed(
                lambda: run.save_checkpoint(0, policy.save, state.state_dict(), config_to_yaml(cfg))
            )
            phases["io"] = extra["metrics_line_s"] + extra["checkpoint_s"] / args.save_every
        peak_mb = peak_rss_mb()  # the run's, before the decoding figures' own buffers
        if args.reference == "shared" and not (args.memory or args.bare):
            prompts = [records[i].prompt for i in range(cfg.rl.batch_size)]
            extra.update(decoding(policy, prompts, sampling))

    step_s = median("step_seconds")
    return {
        "reference": args.reference,
        "policy": args.policy,
        "advantage": cfg.rl.advantage,
        "policy_loss": cfg.rl.policy_loss,
        "group_size": group,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "micro_batch_size": micro_batch_size(cfg, policy.device),
        "threads": torch.get_num_threads(),
        "step_s": step_s,
        "phases": phases,
        "phase_gflop": {k: v / 1e9 for k, v in phase_flops.items()},
        "matmul_gflops": matmul_gflops(),
        "gen_s": median("gen_seconds"),  # the key the peers report (compare_trl.py reads it)
        "gen_share": median("gen_seconds") / step_s,
        "samples_per_s": args.batch_size / step_s,
        "peak_rss_mb": peak_mb,
        "peak_rss_steps_mb": peak_steps_mb,
        "weights_mb": n_weights / 2**20,
        "libraries_mb": libraries_mb,
        "prompt_tokens_mean": statistics.mean(prompt_lens),
        "response_len": statistics.mean(r["response_len_mean"] for r in rows),
        **extra,
    }


def spawn(args: argparse.Namespace, env: dict[str, str] | None = None, **overrides) -> dict:
    """run_one in a fresh process, so each configuration's peak RSS is its own."""
    values = {**vars(args), **overrides}
    argv = [sys.executable, __file__, "--json"] + [
        f"--{k.replace('_', '-')}={v}"
        for k, v in values.items()
        if k not in LOCAL and v is not None
    ]
    argv += [f"--{flag}" for flag in ("memory", "bare") if values[flag]]
    proc = subprocess.run(
        argv, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1", **(env or {})}
    )
    if proc.returncode:
        sys.exit(f"benchmark run failed ({overrides}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def side_by_side(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """Each variant (a string of this script's options on top of the rest) in its own process,
    all of them once a round: the guard, I/O and decoding figures are left out (--bare)."""
    variants = []
    for text in args.side_by_side:
        given = vars(parser.parse_args(shlex.split(text)))
        over = {k: v for k, v in given.items() if k not in LOCAL and v != parser.get_default(k)}
        variants.append((text or "(none)", over))
    results: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for _ in range(args.rounds):
        for name, over in variants:
            results[name].append(spawn(args, reference="shared", bare=True, **over))
    first = results[variants[0][0]][0]
    return {
        **provenance(),
        "command": "python benchmarks/ppo_step.py " + shlex.join(sys.argv[1:]),
        "policy": first["policy"],
        "advantage": first["advantage"],
        "group_size": first["group_size"],
        "batch_size": first["batch_size"],
        "max_new_tokens": first["max_new_tokens"],
        "threads": first["threads"],
        "steps": args.steps,
        "rounds": args.rounds,
        "variants": [
            {
                "options": name,
                "policy_loss": runs[0]["policy_loss"],
                "step_s": [r["step_s"] for r in runs],
                "update_s": [r["phases"]["update"] for r in runs],
                "gen_s": [r["phases"]["gen"] for r in runs],
            }
            for name, runs in results.items()
        ],
    }


def print_side_by_side(record: dict, markdown: bool = False) -> None:
    print(measured_line(record) + ("\n" if markdown else ""))
    base = record["variants"][0]
    step0, update0 = statistics.median(base["step_s"]), statistics.median(base["update_s"])
    rows = []
    for v in record["variants"]:
        step, update = statistics.median(v["step_s"]), statistics.median(v["update_s"])
        rows.append(
            (
                v["options"],
                f"{step:.2f}",
                f"{step / step0:.2f}x",
                f"{update:.2f}",
                f"{update / update0:.2f}x",
                " / ".join(f"{s:.2f}" for s in v["step_s"]),
            )
        )
    headers = ("options", "s/step", "vs first", "update s", "vs first", "s/step by round")
    print(table(headers, rows, markdown))
    print(
        f"\n({record['policy']}, {record['advantage']} (group {record['group_size']}), batch "
        f"{record['batch_size']}, {record['max_new_tokens']} new tokens, {record['threads']} "
        f"threads; each figure the median over {record['rounds']} rounds of the median of "
        f"{record['steps'] - 1} steps after a warm-up; `{record['command']}`)"
    )


def print_phases(r: dict) -> None:
    """The shared run's step, phase by phase, with achieved FLOP/s."""
    total = sum(r["phases"].values())
    peak = r["matmul_gflops"]
    print(
        f"\nphases of a step (shared reference; median of timed steps; guard = one {r['probe_s']:.1f} s "
        f"probe / judge-every, io = metrics line + one {r['checkpoint_s']:.2f} s checkpoint / save-every)"
    )
    print(f"{'phase':<11} {'s':>6} {'share':>6} {'GFLOP':>7} {'GFLOP/s':>8} {'of peak':>8}")
    for name, sec in r["phases"].items():
        gflop = r["phase_gflop"].get(name)
        rate = f"{gflop / sec:>8.1f} {gflop / sec / peak:>7.0%}" if gflop else f"{'':>8} {'':>8}"
        gf = f"{gflop:>7.0f}" if gflop else f"{'':>7}"
        print(f"{name:<11} {sec:>6.2f} {sec / total:>6.0%} {gf} {rate}")
    print(
        f"{'total':<11} {total:>6.2f}        matmul peak (fp32 2048^3, this machine): {peak:.0f} GFLOP/s; "
        f"{r['prompt_tokens_mean']:.0f} prompt tokens on average"
    )
    if "decode_ms" in r:
        n = r["batch_size"]
        print(
            f"\ndecoding ({'the Llama step' if r['llama_step'] else 'the model forward'}), {n} rows: "
            f"{r['decode_ms']:.1f} ms a step; floor: the frozen layers' matmuls alone "
            f"{r['floor_ms']:.1f} ms (blocks {r['floor_blocks_ms']:.1f} + lm_head "
            f"{r['floor_ms'] - r['floor_blocks_ms']:.1f}; torch F.linear fp32 "
            f"{r['floor_flinear_ms']:.1f}) -> {r['decode_ms'] / r['floor_ms']:.2f}x "
            f"the floor; {r['decode_weight_mb']:.0f} MB of weights a step at {r['copy_gbps']:.0f} GB/s "
            f"copy bandwidth = {r['bytes_floor_ms']:.1f} ms"
        )


def memory(args: argparse.Namespace) -> None:
    """Peak RSS of the shared run's PPO steps, taken apart, and what lowering it costs in time.

    glibc keeps freed memory for reuse, and the phases of a step (decoding, the reference pass,
    the update) free and allocate different sizes, so part of the peak is memory no tensor holds.
    With MALLOC_TRIM_THRESHOLD_ set glibc hands freed memory back (and stops raising its mmap
    threshold), so that run's peak is close to the live peak, paid for in page faults.
    """
    whole = f"--gradient-accumulation-steps 1 ({args.mini_batch_size} a micro-batch)"
    settings = [
        ("default (2 a micro-batch on CPU)", {}, {}),
        (whole, {}, {"gradient_accumulation_steps": 1}),
        ("default, glibc gives freed memory back", {"MALLOC_TRIM_THRESHOLD_": str(2**20)}, {}),
    ]
    results = [spawn(args, env=env, reference="shared", **kw) for _, env, kw in settings]
    r0 = results[0]
    print(
        f"policy {r0['policy']}  batch {r0['batch_size']}  new tokens {r0['max_new_tokens']}  "
        f"mini-batch {args.mini_batch_size}  steps {args.steps} (median of {args.steps - 1})"
    )
    print(f"{'setting':<50} {'s/step':>7} {'peak RSS MB':>11} {'saved activations MB':>20}")
    for (name, _, _), r in zip(settings, results, strict=True):
        print(
            f"{name:<50} {r['step_s']:>7.2f} {r['peak_rss_steps_mb']:>11.0f} "
            f"{r['saved_activation_mb']:>20.0f}"
        )
    live, peak = results[2]["peak_rss_steps_mb"], r0["peak_rss_steps_mb"]
    print(
        f"default peak {peak:.0f} MB = libraries {r0['libraries_mb']:.0f} + weights "
        f"{r0['weights_mb']:.0f} + activations of one micro-batch {r0['saved_activation_mb']:.0f} "
        f"+ the rest of the live peak {live - r0['libraries_mb'] - r0['weights_mb'] - r0['saved_activation_mb']:.0f} "
        f"(backward, optimiser, buffers) + allocator-held {peak - live:.0f}"
    )


def scaling(args: argparse.Namespace) -> None:
    results = [spawn(args, reference="shared", batch_size=b, max_new_tokens=t) for b, t in SCALING]
    print(
        f"{'batch':>5} {'tokens':>6} {'s/step':>7} {'samples/s':>9} {'s per 1k tokens':>15} "
        + " ".join(f"{p:>6}" for p in PHASES[:5])
        + f" {'peak RSS MB':>11}"
    )
    for r in results:
        per_k = 1000 * r["step_s"] / (r["batch_size"] * r["max_new_tokens"])
        print(
            f"{r['batch_size']:>5} {r['max_new_tokens']:>6} {r['step_s']:>7.2f} {r['samples_per_s']:>9.2f} {per_k:>15.2f} "
            + " ".join(f"{r['phases'][p]:>6.2f}" for p in PHASES[:5])
            + f" {r['peak_rss_mb']:>11.0f}"
        )
    if args.plot:
        plot_scaling(results, Path(args.plot))
        Path(args.plot).with_suffix(".json").write_text(json.dumps(results, indent=2))
        print(f"plot: {args.plot} (numbers beside it, .json)")


def plot_scaling(results: list[dict], path: Path) -> None:
    """Stacked phase seconds against batch size and against new tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for ax, key, fixed, label in (
        (axes[0], "batch_size", ("max_new_tokens", 48), "completions per step (48 new tokens)"),
        (axes[1], "max_new_tokens", ("batch_size", 16), "new tokens per completion (batch 16)"),
    ):
        rows = sorted((r for r in results if r[fixed[0]] == fixed[1]), key=lambda r: r[key])
        xs = [str(r[key]) for r in rows]
        bottom = [0.0] * len(rows)
        for phase in PHASES[:5]:
            vals = [r["phases"][phase] for r in rows]
            ax.bar(xs, vals, bottom=bottom, label=phase)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.set_xlabel(label)
        ax.set_ylabel("seconds per PPO step")
    axes[0].legend()
    fig.suptitle("tether PPO step on this machine, by phase")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--policy", default="smollm2")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mini-batch-size", type=int, default=4)
    parser.add_argument("--ppo-epochs", type=int, default=1)
    parser.add_argument(
        "--gradient-accumulation-steps",
        type=int,
        help="micro-batches per mini-batch (default: tether's, micro-batches of 2 on CPU)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument(
        "--advantage",
        choices=["gae", "grpo", "rloo", "reinforce++"],
        help="advantage estimator (default: tether's, gae)",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        help="completions per prompt (default: tether's for the estimator)",
    )
    parser.add_argument("--kl-coef", type=float, help="KL coefficient beta (default: tether's)")
    parser.add_argument(
        "--kl-penalty", choices=["reward", "loss"], help="where the KL goes (default: tether's)"
    )
    parser.add_argument(
        "--kl-estimator",
        choices=["k1", "k2", "k3", "full"],
        help="per-token KL (default: tether's); full = exact over the vocabulary",
    )
    parser.add_argument(
        "--policy-loss",
        choices=["clip", "gspo", "cispo", "sapo"],
        help="the policy loss (default: tether's, clip)",
    )
    parser.add_argument("--cliprange-high", type=float, help="clip-higher's epsilon_high")
    parser.add_argument(
        "--kl-bias-correction",
        nargs="?",
        const=True,
        type=lambda text: text.lower() in ("1", "true", "on"),
        help="k3 in the loss weighted by the importance ratio (default: tether's, off)",
    )
    parser.add_argument("--steps", type=int, default=5, help="including one warm-up step")
    parser.add_argument("--judge-every", type=int, default=10, help="guard probe interval")
    parser.add_argument("--probe-prompts", type=int, default=32)
    parser.add_argument("--save-every", type=int, default=10, help="checkpoint interval")
    parser.add_argument("--reference", choices=["shared", "full-copy", "both"], default="both")
    parser.add_argument("--scaling", action="store_true", help="batch and token sweeps")
    parser.add_argument("--plot", help="with --scaling: write the curves to this PNG")
    parser.add_argument("--memory", action="store_true", help="what the peak RSS is made of")
    parser.add_argument(
        "--side-by-side",
        nargs="+",
        metavar="OPTIONS",
        help='variants to time against each other, e.g. "" "--policy-loss sapo"',
    )
    parser.add_argument("--rounds", type=int, default=2, help="with --side-by-side")
    parser.add_argument("--save", type=Path, help="with --side-by-side: the results file")
    parser.add_argument("--show", type=Path, help="print a --side-by-side results file")
    parser.add_argument("--markdown", action="store_true", help="with --show")
    parser.add_argument(
        "--json", action="store_true", help="(internal) run one configuration, print JSON"
    )
    parser.add_argument("--bare", action="store_true", help="(internal) the steps alone")
    args = parser.parse_args()

    if args.json:
        print(json.dumps(run_one(args)))
        return
    if args.show:
        print_side_by_side(json.loads(args.show.read_text()), args.markdown)
        return
    if args.side_by_side:
        record = side_by_side(args, parser)
        if args.save:
            args.save.write_text(json.dumps(record, indent=2) + "\n")
        print_side_by_side(record)
        return
    if args.scaling:
        scaling(args)
        return
    if args.memory:
        memory(args)
        return
    modes = ["shared", "full-copy"] if args.reference == "both" else [args.reference]
    results = [spawn(args, reference=mode) for mode in modes]
    r0 = results[0]
    print(
        f"policy {r0['policy']}  advantage {r0['advantage']} (group {r0['group_size']})  "
        f"loss {r0.get('policy_loss', 'clip')}  "
        f"batch {r0['batch_size']}  new tokens {r0['max_new_tokens']}  "
        f"threads {r0['threads']}  steps {args.steps} (median of {args.steps - 1} after 1 warm-up)"
    )
    print(f"{'reference':<10} {'s/step':>7} {'gen %':>6} {'samples/s':>9} {'peak RSS MB':>11}")
    for r in results:
        print(
            f"{r['reference']:<10} {r['step_s']:>7.2f} {100 * r['gen_share']:>5.0f}% "
            f"{r['samples_per_s']:>9.2f} {r['peak_rss_mb']:>11.0f}"
        )
    if len(results) == 2:
        saved = results[1]["peak_rss_mb"] - results[0]["peak_rss_mb"]
        print(
            f"base weights {r0['weights_mb']:.0f} MB; full-copy peak RSS - shared peak RSS = {saved:.0f} MB "
            f"({saved / r0['weights_mb']:.0%} of the weights); shared/full-copy peak = "
            f"{results[0]['peak_rss_mb'] / results[1]['peak_rss_mb']:.2f}"
        )
    if r0["reference"] == "shared":
        print_phases(r0)


if __name__ == "__main__":
    main()
