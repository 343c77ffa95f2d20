"""Soak test of crash-safe resume: a long `tether train` on a tiny random Llama, killed with
SIGKILL at random moments and resumed each time, must end with a continuous metrics.jsonl (every
step exactly once) and, with --compare, the same adapter and metrics as an uninterrupted run.

    python benchmarks/soak.py                      # 200 steps, checkpoint every 10, 3 kills
    python benchmarks/soak.py --steps 50 --kills 5 --no-compare

Each run is `python -m tether train` in its own process (the code of this checkout), with
one intra-op thread. Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import save_tiny_llama  # noqa: E402  (the tests' tiny Llama and char tokenizer)

WORDS = ["hello there", "how are you", "tell me a story", "the cat sat", "good morning"]
WORDS += ["what is this", "once upon a time", "see you soon", "a bad day", "an apple a day"]


def train_argv(work: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tether",
        "train",
        "--policy",
        str(work / "model"),
        "--reward",
        f"python:{work / 'reward.py'}:frac_a",
        "--prompts",
        f"jsonl:{work / 'prompts.jsonl'}",
        "--out",
        str(out),
        "--steps",
        str(args.steps),
        "--save-every",
        str(args.save_every),
        "--batch-size",
        "4",
        "--mini-batch-size",
        "2",
        "--max-new-tokens",
        "8",
        "--lora-r",
        "4",
        "--lr",
        "0.003",
        "--target-kl",
        "2.0",
        "--judge-every",
        str(args.judge_every),
        "--probe-prompts",
        "2",
        "--seed",
        str(args.seed),
        "--no-progress",
    ]


def n_rows(out: Path) -> int:
    try:
        return (out / "metrics.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def run_to_end(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"soak: run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--kills", type=int, default=3, help="every third one hits a save")
    parser.add_argument("--judge-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0, help="the training seed")
    parser.add_argument("--kill-seed", type=int, default=None, help="kill times (default: random)")
    parser.add_argument("--no-compare", dest="compare", action="store_false")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it")
    args = parser.parse_args()

    work = Path(args.keep or tempfile.mkdtemp(prefix="tether-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    save_tiny_llama(work / "model")
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": w}) + "\n" for w in WORDS))
    (work / "reward.py").write_text(
        "def frac_a(prompts, completions):\n"
        "    return [c.count('a') / max(len(c), 1) for c in completions]\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    out = work / "soaked"
    argv = train_argv(work, out, args)
    kill_seed = args.kill_seed if args.kill_seed is not None else random.randrange(2**31)
    rng = random.Random(kill_seed)
    # kill during the step after a random number of rows: the kills land in steps, probes and
    # checkpoint saves alike, and some before the first checkpoint of a (re)start
    targets = sorted(rng.sample(range(1, args.steps - 1), args.kills))
    t_start = time.perf_counter()
    kills = []
    for i, target in enumerate(targets):
        proc = subprocess.Popen(
            argv + (["--resume"] if i else []),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        while n_rows(out) < target and proc.poll() is None:
            time.sleep(0.005)
        if i % 3 == 1:  # every third kill waits for a checkpoint being written and hits it
            where = "while checkpoints/.step-N.tmp was being written"
            while proc.poll() is None and not list((out / "checkpoints").glob(".step-*.tmp-*")):
                time.sleep(0.001)
        else:
            where = "at a random moment of the step"
            time.sleep(rng.uniform(0.0, 0.15))
        if proc.poll() is not None:
            print(f"soak: the run ended before kill {i + 1}:\n{proc.stderr.read()[-2000:]}")
            return 1
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rows = n_rows(out)
        ckpts = sorted(
            int(p.name.split("-")[1])
            for p in (out / "checkpoints").glob("step-*")
            if (p / "tether-complete.json").exists()
        )
        temps = [p.name for p in out.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
        kills.append((rows, ckpts[-1] if ckpts else None, temps))
        print(
            f"kill {i + 1} ({where}): SIGKILL with {rows} metrics rows written, last complete checkpoint "
            f"step-{ckpts[-1] if ckpts else 'none'}, temp dirs left: {temps or 'none'}"
        )
    run_to_end(argv + ["--resume"], env)
    soak_s = time.perf_counter() - t_start

    ok = True
    lines = (out / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    steps = [r["step"] for r in rows]
    continuous = steps == list(range(args.steps))
    ok &= continuous
    print(
        f"metrics.jsonl: {len(rows)} rows, steps 0..{args.steps - 1} each exactly once: "
        f"{continuous}"
    )
    leftovers = [str(p.relative_to(out)) for p in out.rglob(".*")]
    ok &= not leftovers and (out / "final" / "adapter_model.safetensors").is_file()
    print(f"final/ written: {(out / 'final').is_dir()}; temp dirs left: {leftovers or 'none'}")
    if args.compare:
        ref = work / "uninterrupted"
        ref_s = run_to_end(train_argv(work, ref, args), env)
        from safetensors.torch import load_file

        diffs = []
        for name in ("adapter_model.safetensors", "value_head.safetensors"):
            a, b = load_file(out / "final" / name), load_file(ref / "final" / name)
            assert a.keys() == b.keys()
            diffs += [float((a[k] - b[k]).abs().max()) for k in a]
        ref_rows = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]

        def strip(r: dict) -> dict:
            return {k: v for k, v in r.items() if "seconds" not in k}

        same_rows = [strip(r) for r in rows] == [strip(r) for r in ref_rows]
        max_diff = max(diffs)
        ok &= same_rows and max_diff <= 1e-6
        print(
            f"vs uninterrupted ({ref_s:.0f} s): adapter + value head max |diff| {max_diff:.3g} "
            f"over {len(diffs)} tensors; metrics rows equal (timing fields aside): {same_rows}"
        )
    print(
        f"soak: {args.steps} steps, checkpoint every {args.save_every}, {args.kills} kills "
        f"(kill seed {kill_seed}) + resumes in {soak_s:.0f} s: {'PASS' if ok else 'FAIL'}"
    )
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
