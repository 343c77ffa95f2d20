"""tether's step against TRL's, estimator for estimator, on the same model, prompts, batch,
LoRA, group size, KL coefficient and token counts.

    .venv/bin/python benchmarks/compare_trl.py              # make bench-trl
    .venv/bin/python benchmarks/compare_trl.py --smoke      # tiny shapes: does everything run?
    .venv/bin/python benchmarks/compare_trl.py --only tether-grpo,trl116-grpo --rounds 3
    .venv/bin/python benchmarks/compare_trl.py --before ../before --llama-step both

`--before DIR` adds each tether row as an earlier checkout DIR runs it (`git worktree add DIR
REV`: its own benchmarks/ppo_step.py and src/, this interpreter), `@before` in the table, so a
change is measured against what it replaced in the same run; `--llama-step both` adds each
tether row with the Llama decoding step off (TETHER_LLAMA_STEP=0), `-nostep` in the table.
`--save FILE` writes every run's figures with the date, the CPU and the versions as JSON, and
`--show FILE` prints the table of such a file again (the README's table comes from
benchmarks/results/compare_trl.json).

Three like-for-like pairs, each tether row run by benchmarks/ppo_step.py with this interpreter
(the project venv) and each peer by benchmarks/peers/*.py in its own virtual environment under
.bench/ (made on first use: the peers need their own transformers/peft):

    tether       (--advantage gae: PPO with a critic)  vs trl011       TRL 0.11.4's PPOTrainer v1
    tether-rloo  (--advantage rloo)                    vs trl116       TRL 1.16's RLOOTrainer
    tether-grpo  (--advantage grpo)                    vs trl116-grpo  TRL 1.16's GRPOTrainer

TRL 0.11.4's PPOTrainer v1 is the step-wise PPO API that tether's loop mirrors (TRL 1.16 ships
no PPO trainer, not even under trl.experimental). The critic-free pairs sample --group-size
completions of each of batch_size / group_size prompts; every pair uses --kl-coef as beta, with
the KL where each estimator puts it (PPO and RLOO: in the reward; GRPO: k3 in the loss).

Shape: SmolLM2-135M-Instruct in fp32 on the CPU, the chat template around examples/prompts.jsonl,
exactly --max-new-tokens per completion (min = max, pure sampling), LoRA r=16 alpha=32 on
q_proj/v_proj, mini-batch 4, one epoch, a trivial reward, the reference = the policy with its
adapter off. The peers cycle the prompts in file order and use lr 1e-5; ppo_step.py samples
tether's seeded order and keeps tether's lr (neither changes what a step costs). Every run is
its own process, so peak RSS is that tool's alone; the tools alternate within each round, each
pair back to back, so that a slow spell of a shared machine does not land on one tool only.
Figures are medians over rounds, each run's own figure being the median of its steps after one
warm-up step. The machine's other load shows in every figure: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from results_io import cpu, measured_line, provenance, revision, table

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
PROMPTS = ROOT / "examples" / "prompts.jsonl"
PEERS_DIR = ROOT / "benchmarks" / "peers"


@dataclass(frozen=True)
class Peer:
    script: str
    venv: str  # .bench/VENV
    packages: tuple[str, ...]  # exact pins, so a rerun measures the same code


# torch is pinned in every venv: 2.13.0 is the CPU wheel this machine keeps on disk, and an
# unpinned torch pulls a multi-GB CUDA build.
# trl 0.11.4 imports rich without declaring it (tyro used to bring it in).
TRL011 = (
    "torch==2.13.0",
    "trl==0.11.4",
    "transformers==4.46.3",
    "peft==0.13.2",
    "accelerate==1.1.1",
    "rich",
)
# transformers/peft/accelerate as TRL 1.16 resolves them, which are also tether's own.
TRL116 = (
    "torch==2.13.0",
    "trl==1.16.0",
    "transformers==5.23.0",
    "peft==0.21.2",
    "accelerate==1.15.0",
)
PEERS = {
    "trl011": Peer("trl011_ppo.py", "trl011", TRL011),
    "trl116": Peer("trl116_rloo.py", "trl116", TRL116),
    "trl116-grpo": Peer("trl116_grpo.py", "trl116", TRL116),
}
# tether's rows: tool name -> ppo_step.py --advantage (None: tether's default, gae)
TETHER = {"tether": None, "tether-rloo": "rloo", "tether-grpo": "grpo"}
# the like-for-like pairs (tether row, peer row); also the order the tools run in
PAIRS = (("tether", "trl011"), ("tether-rloo", "trl116"), ("tether-grpo", "trl116-grpo"))
TOOLS = tuple(tool for pair in PAIRS for tool in pair)
GROUPED = {"tether-rloo", "tether-grpo", "trl116", "trl116-grpo"}  # group_size completions a prompt
# the issue's bar for a pair: tether at least this many times the peer's samples/s ...
BAR_SPEED = 1.5
# ... with a peak RSS at most this many times the peer's
BAR_RSS = 1.0
# Offline, CPU only, no trackers, no progress bars: the peers must not reach for a hub or a GPU.
ENV = {
    **os.environ,
    "CUDA_VISIBLE_DEVICES": "",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_DISABLED": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "TQDM_DISABLE": "1",
}


def ensure_venv(peer: Peer) -> Path:
    """Create .bench/VENV with the peer's pinned packages unless its marker says it is done."""
    venv = BENCH / peer.venv
    python = venv / "bin" / "python"
    marker = venv / ".bench-installed"
    wanted = "\n".join(peer.packages)
    if marker.is_file() and marker.read_text() == wanted and python.exists():
        return python
    print(f"setting up {venv.relative_to(ROOT)}: {' '.join(peer.packages)}", flush=True)
    subprocess.run(["python3.11", "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    # torch alone first, so that pip takes the wheel on disk before anything can ask for another
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, *peer.packages], check=True)
    marker.write_text(wanted)
    print(f"{venv.relative_to(ROOT)} ready", flush=True)
    return python


def smollm2_dir() -> Path:
    """tether's safetensors copy of SmolLM2-135M-Instruct, built from the wheel if missing."""
    out = subprocess.run(
        [sys.executable, "-c", "from tether.models import smollm2_dir; print(smollm2_dir())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def transformers4_copy(src: Path) -> Path:
    """The same model for transformers 4.46, which cannot read what transformers 5 wrote.

    tether's cache was saved by transformers 5: config.json keeps rope_theta inside
    rope_parameters (4.46 would silently fall back to rope_theta 10000, a different model) and
    says dtype for torch_dtype; tokenizer_config.json names the class TokenizersBackend (4.46:
    PreTrainedTokenizerFast) and the chat template sits in chat_template.jinja, a file 4.46 does
    not read. So .bench/smollm2-tf4 holds patched copies of those two files and links to the
    rest; rewritten on every run, it cannot go stale.
    """
    dst = BENCH / "smollm2-tf4"
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        link = dst / f
        link.unlink(missing_ok=True)
        link.symlink_to(src / f)
    config = json.loads((src / "config.json").read_text())
    rope = config.pop("rope_parameters", {})
    config["rope_theta"] = rope.get("rope_theta", 10000.0)
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = rope
    config["torch_dtype"] = config.pop("dtype", "float32")
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    tok = json.loads((src / "tokenizer_config.json").read_text())
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok["chat_template"] = (src / "chat_template.jinja").read_text()
    (dst / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
    return dst


@dataclass(frozen=True)
class Variant:
    """A way to run tether's rows: its table suffix, extra environment and checkout."""

    suffix: str
    env: tuple[tuple[str, str], ...] = ()
    root: Path = ROOT


def run(argv: list[str], label: str, env: dict[str, str] | None = None) -> dict:
    """One benchmark process; returns the JSON of its last stdout line."""
    proc = subprocess.run(
        argv, capture_output=True, text=True, env={**ENV, **(env or {})}, cwd=ROOT
    )
    if proc.returncode:
        sys.exit(f"{label} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tether_argv(args: argparse.Namespace, advantage: str | None, root: Path = ROOT) -> list[str]:
    estimator = (
        [] if advantage is None else [f"--advantage={advantage}", f"--group-size={args.group_size}"]
    )
    return [
        sys.executable,
        str(root / "benchmarks" / "ppo_step.py"),
        "--json",
        "--reference=shared",
        "--policy=smollm2",
        *estimator,
        f"--kl-coef={args.kl_coef}",
        f"--batch-size={args.batch_size}",
        f"--max-new-tokens={args.max_new_tokens}",
        f"--mini-batch-size={args.mini_batch_size}",
        "--ppo-epochs=1",
        "--lora-r=16",
        f"--steps={args.steps}",
    ]


def peer_argv(python: Path, peer: Peer, model: Path, args: argparse.Namespace) -> list[str]:
    return [
        str(python),
        str(PEERS_DIR / peer.script),
        f"--model={model}",
        f"--prompts={PROMPTS}",
        f"--steps={args.steps}",
        f"--batch-size={args.batch_size}",
        f"--max-new-tokens={args.max_new_tokens}",
        f"--mini-batch-size={args.mini_batch_size}",
        f"--group-size={args.group_size}",
        f"--kl-coef={args.kl_coef}",
        "--lora-r=16",
        "--lr=1e-5",
    ]


def summarize(runs: list[dict]) -> dict:
    """Medians over rounds."""
    return {
        key: statistics.median(r[key] for r in runs)
        for key in ("step_s", "gen_s", "samples_per_s", "peak_rss_mb", "response_len")
    }


def print_table(
    results: dict[str, list[dict]],
    versions: dict[str, str],
    tools: dict[str, str],
    markdown: bool = False,
) -> None:
    """`results` and `versions` by row; `tools` says which tool each row runs."""
    if markdown:  # the docs show the current checkout only, not --before's rows
        results = {k: v for k, v in results.items() if "@" not in k}
    rows = {tool: summarize(runs) for tool, runs in results.items()}
    headers = ("tool", "version", "s/step", "samples/s", "gen %", "peak RSS MB", "new tok")
    body = [
        (
            tool,
            versions[tool],
            f"{r['step_s']:.2f}",
            f"{r['samples_per_s']:.2f}",
            f"{100 * r['gen_s'] / r['step_s']:.0f}%",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['response_len']:.1f}",
        )
        for tool, r in rows.items()
    ]
    print(table(headers, body, markdown))
    threads = sorted({r["threads"] for runs in results.values() for r in runs})
    print(f"\ntorch threads per process: {', '.join(map(str, threads))}")
    peer_of = dict(PAIRS)
    pairs = [
        (row, peer_of[tool])
        for row, tool in tools.items()
        if row in rows and peer_of.get(tool) in rows
    ]
    if not pairs:
        return
    print(
        "\nlike for like: speed x = tether samples/s / peer samples/s, RSS x = tether peak RSS / "
        "peer peak RSS"
        + ("" if markdown else f"; bar = speed x >= {BAR_SPEED} and RSS x <= {BAR_RSS}")
        + "\n"
    )
    body = []
    for t, p in pairs:
        speed = rows[t]["samples_per_s"] / rows[p]["samples_per_s"]
        rss = rows[t]["peak_rss_mb"] / rows[p]["peak_rss_mb"]
        met = "met" if speed >= BAR_SPEED and rss <= BAR_RSS else "no"
        body.append((t, p, f"{speed:.2f}x", f"{rss:.2f}x", met)[: 4 if markdown else 5])
    headers = ("tether", "peer", "speed x", "RSS x", "bar")[: 4 if markdown else 5]
    print(table(headers, body, markdown))


def peer_version(v: dict[str, str]) -> str:
    return f"trl {v['trl']}, tf {v['transformers']}, peft {v['peft']}"


def show(path: Path, markdown: bool = False) -> None:
    """The table of a `--save` file, with the date, CPU and shape it was measured with."""
    record = json.loads(path.read_text())
    a = record["args"]
    print(measured_line(record) + ("\n" if markdown else ""))
    print(
        f"SmolLM2-135M-Instruct fp32 CPU  batch {a['batch_size']}  group {a['group_size']} "
        f"(rloo, grpo)  kl_coef {a['kl_coef']}  new tokens {a['max_new_tokens']}  mini-batch "
        f"{a['mini_batch_size']}  steps {a['steps']} (median of {a['steps'] - 1} after 1 "
        f"warm-up)  rounds {a['rounds']}\n"
    )
    print_table(record["runs"], record["versions"], record["tools"], markdown)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=5, help="per run, including one warm-up")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every tool, alternating")
    parser.add_argument("--batch-size", type=int, default=16, help="completions per step")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--mini-batch-size", type=int, default=4)
    parser.add_argument(
        "--group-size",
        type=int,
        default=4,
        help="completions per prompt of the rloo and grpo rows (tether and TRL alike)",
    )
    parser.add_argument(
        "--kl-coef", type=float, default=0.05, help="KL coefficient beta of every row"
    )
    parser.add_argument(
        "--only",
        default=",".join(TOOLS),
        help=f"comma-separated subset of tools, run in the order given (all: {','.join(TOOLS)})",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="2 steps, batch 4, 8 tokens: check that all runs"
    )
    parser.add_argument(
        "--before", help="an earlier checkout whose tether rows run beside today's (@before)"
    )
    parser.add_argument(
        "--llama-step",
        choices=["on", "off", "both"],
        default="on",
        help="tether's Llama decoding step: on (the default), off, or both side by side (-nostep)",
    )
    parser.add_argument("--save", help="write every run's figures, date, CPU, versions as JSON")
    parser.add_argument("--show", help="print the table of a file that --save wrote, and stop")
    parser.add_argument("--markdown", action="store_true", help="with --show: a Markdown table")
    args = parser.parse_args()
    if args.show:
        show(Path(args.show), args.markdown)
        return
    if args.smoke:
        args.steps, args.batch_size, args.max_new_tokens = 2, 4, 8
    args.mini_batch_size = min(args.mini_batch_size, args.batch_size)
    tools = [t.strip() for t in args.only.split(",") if t.strip()]
    if unknown := set(tools) - set(TOOLS):
        parser.error(f"unknown tool(s) {sorted(unknown)}; choose from {', '.join(TOOLS)}")
    if args.steps < 2:
        parser.error("--steps must be at least 2 (one warm-up, one timed)")
    if args.batch_size % args.mini_batch_size:
        parser.error("--batch-size must be divisible by --mini-batch-size")
    if GROUPED & set(tools):
        if args.group_size < 2:
            parser.error("--group-size must be at least 2 (RLOO and GRPO compare siblings)")
        if args.batch_size % args.group_size:
            parser.error(
                f"--batch-size {args.batch_size} must be divisible by --group-size "
                f"{args.group_size} (whole prompt groups a step)"
            )

    variants = [Variant("")]
    if args.before:
        before = Path(args.before).resolve()
        if not (before / "benchmarks" / "ppo_step.py").is_file():
            parser.error(f"--before {args.before}: no benchmarks/ppo_step.py there")
        variants.append(Variant("@before", (("PYTHONPATH", str(before / "src")),), before))
    if args.llama_step in ("off", "both"):
        off = Variant("-nostep", (("TETHER_LLAMA_STEP", "0"),))
        variants = [off] if args.llama_step == "off" else [*variants, off]

    model = smollm2_dir()
    models = {"trl116": model, "trl116-grpo": model}
    if "trl011" in tools:
        models["trl011"] = transformers4_copy(model)
    pythons = {t: ensure_venv(PEERS[t]) for t in tools if t in PEERS}
    tether_version = (
        f"tether {version('tether')}, tf {version('transformers')}, peft {version('peft')}"
    )
    # every row of the table: (row name, tool, variant), in the order they run within a round
    rows = [
        (tool + v.suffix, tool, v) if tool in TETHER else (tool, tool, None)
        for tool in tools
        for v in (variants if tool in TETHER else variants[:1])
    ]
    versions = {name: tether_version for name, tool, _ in rows if tool in TETHER}
    machine = cpu()
    print(f"CPU: {machine}", flush=True)
    print(
        f"SmolLM2-135M-Instruct fp32 CPU  batch {args.batch_size}  group {args.group_size} "
        f"(rloo, grpo)  kl_coef {args.kl_coef}  new tokens {args.max_new_tokens}  mini-batch "
        f"{args.mini_batch_size}  steps {args.steps} (median of {args.steps - 1} after 1 "
        f"warm-up)  rounds {args.rounds}",
        flush=True,
    )
    results: dict[str, list[dict]] = {name: [] for name, _, _ in rows}
    for rnd in range(1, args.rounds + 1):
        for name, tool, variant in rows:
            if variant is not None:
                r = run(tether_argv(args, TETHER[tool], variant.root), name, dict(variant.env))
            else:
                r = run(peer_argv(pythons[tool], PEERS[tool], models[tool], args), name)
                versions[name] = peer_version(r["versions"])
            results[name].append(r)
            print(f"round {rnd}/{args.rounds} {name}: {r['step_s']:.2f} s/step", flush=True)
    print_table(results, versions, {name: tool for name, tool, _ in rows})
    if args.save:
        record = {
            **provenance(),
            "revisions": {v.suffix or "main": revision(v.root) for v in variants},
            "args": vars(args),
            "versions": versions,
            "tools": {name: tool for name, tool, _ in rows},
            "runs": results,
        }
        Path(args.save).write_text(json.dumps(record, indent=2))
        print(f"figures: {args.save}")


if __name__ == "__main__":
    main()
