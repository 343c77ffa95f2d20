"""tether's GRPO and PPO steps on a GPU, phase by phase, with decoding against its floor, and TRL
1.16's GRPOTrainer on the same shape in the same run.

    python benchmarks/gpu_step.py                          # the GPU shape (below), on cuda
    python benchmarks/gpu_step.py --cpu                    # the same flow, tiny, on the CPU
    python benchmarks/gpu_step.py --runs qwen:grpo:eager,qwen:grpo:static --save out.json
    python benchmarks/gpu_step.py --show out.json          # the table of a results file again

Shape (the GPU default): random-init models built from the config files in benchmarks/configs/
(shapes only, no weights, no network), a bf16 base with LoRA r16 (alpha 32, PEFT's default
targets: q/v projections) trained in fp32; GRPO with 8 completions of each of 8 prompts and
PPO with GAE and a critic on 64 prompts, exactly 256 new tokens each (min = max), mini-batch
16, one epoch, a trivial reward (examples/rewards.py:positive_words). `--cpu`: the same config
files scaled down (2 layers, width 64, vocabulary 512), 2 prompts x 2 completions, 8 new
tokens, fp32, in this process (TRL in its own): the test suite runs it (tests/test_gpu_step.py) so it stays
alive where there is no GPU.

A run is MODEL:ESTIMATOR:DECODE: MODEL a config file's short name (qwen, smollm2, t5),
ESTIMATOR grpo or gae, DECODE eager (the default path) or static (TETHER_STATIC_DECODE=1:
a static KV cache, which transformers' generate() compiles with CUDA graphs on a GPU when the
policy has no value head), `trl` for TRL's GRPOTrainer (HF generate, no vLLM) on the causal
model, where `import trl` gives 1.16 (else the run is reported as skipped, with the reason).
On a GPU every run is its own process, so peak GPU memory is that run's alone.

Per run it prints seconds per step by phase (tether's own timers: gen, score, forward,
advantages, update), decode milliseconds per token against the floor, generation tokens/s and
peak memory. Decode ms/token = (the timed steps' gen phase - a prompt-only generate of the same
batch) / (new tokens - 1). The floor = the bytes one decoding step must read (every weight on
the decoding side, bf16: each linear layer, the lm_head, LoRA; not T5's encoder or its
cross-attention K/V projections, computed once; plus the KV cache at its mean length over the
steps, T5's cross-attention cache at the encoder's length) over the copy bandwidth measured in
the same run (a device-to-device copy, bytes read + written per second). No GPU figures have
been measured with this script yet: docs/guides/gpu.md says how to take them.
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
import time
from pathlib import Path

from results_io import measured_line, provenance, table

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "benchmarks" / "configs"
PROMPTS = ROOT / "examples" / "prompts.jsonl"
REWARD = f"python:{ROOT / 'examples' / 'rewards.py'}:positive_words"
MODELS = {"qwen": "qwen2.5-0.5b", "smollm2": "smollm2-360m", "t5": "flan-t5-base"}
# --cpu: each config file at this size (and its own layer types, attention layout and tying)
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "d_model": 64,
    "d_kv": 16,
    "d_ff": 128,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_heads": 4,
    "vocab_size": 512,
}
PHASES = ["gen", "score", "forward", "advantages", "update"]
# in order of what matters most, so that a run cut short by --budget loses the least
RUNS = "qwen:grpo:eager,qwen:trl:eager,qwen:gae:eager,t5:grpo:eager,t5:gae:eager,qwen:grpo:static"
# a chat template for the synthetic tokenizer: TRL applies one to conversational prompts, and
# tether then applies the same one (its chat_template "auto")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}"
    "> {% endif %}"
)


# ----------------------------------------------------------------------------------------------
# the models: config file -> random weights + a synthetic tokenizer, saved as a model dir
# ----------------------------------------------------------------------------------------------


def synthetic_tokenizer(vocab_size: int):
    """One token per character for prompts, then filler tokens up to the model's vocabulary, so
    that every id a random model samples decodes to text; ids 0-3 are pad, eos, bos, unk as in
    the config files."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<s>", "<unk>"]
    chars = list(dict.fromkeys(string.printable))
    names = specials + chars
    names += [f"<x{i}>" for i in range(vocab_size - len(names))]
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(names)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def model_config(name: str, tiny: bool) -> dict:
    cfg = json.loads((CONFIGS / f"{MODELS[name]}.json").read_text())
    if tiny:
        cfg.update({k: v for k, v in TINY.items() if k in cfg})
    return cfg


def build_model_dir(name: str, tiny: bool, device: str, dtype: str, out: Path) -> Path:
    """A model directory for `name`: random weights in `dtype` (initialised on `device`, which is
    much faster than the CPU for a 0.5B model) and the synthetic tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg = model_config(name, tiny)
    config = AutoConfig.for_model(**cfg)
    auto = AutoModelForSeq2SeqLM if cfg.get("is_encoder_decoder") else AutoModelForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = auto.from_config(config, dtype=getattr(torch, dtype))
    path = out / MODELS[name]
    model.save_pretrained(path)
    synthetic_tokenizer(config.vocab_size).save_pretrained(path)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return path


# ----------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_gbps(device, nbytes: int) -> float:
    """Bytes read + written per second by a copy of an `nbytes` tensor on `device`, best of 5."""
    import torch

    src = torch.empty(max(nbytes, 2**26) // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def decode_bytes(base, batch: int, prompt_len: int, new_tokens: int) -> dict[str, float]:
    """What one decoding step reads, averaged over the steps: the decoding side's weights and the
    KV cache at its mean length (see the module docstring)."""
    import torch

    cfg = base.config
    enc_dec = bool(getattr(cfg, "is_encoder_decoder", False))
    weights = 0
    for name, module in base.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if enc_dec and not (name.startswith("decoder.") or name.endswith("lm_head")):
            continue
        if enc_dec and ("EncDecAttention.k" in name or "EncDecAttention.v" in name):
            continue  # cross-attention keys/values: computed once from the encoder's output
        weights += sum(p.numel() * p.element_size() for p in module.parameters(recurse=True))
    elem = next(base.parameters()).element_size()
    mean_len = new_tokens / 2  # the generated part of the cache, averaged over the steps
    if enc_dec:
        per_pos = cfg.num_decoder_layers * 2 * cfg.num_heads * cfg.d_kv * elem
        kv = per_pos * batch * (mean_len + prompt_len)  # self-attention + cross-attention
    else:
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv = cfg.num_hidden_layers * 2 * heads * head_dim * elem * batch * (prompt_len + mean_len)
    return {"weight_bytes": weights, "kv_bytes": kv}


def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_tether(args: argparse.Namespace, model_dir: Path, estimator: str, decode: str) -> dict:
    """One tether run in this process: args.steps steps (the first a warm-up), then the decoding
    figures."""
    import torch

    from tether import fastpath, llama_step
    from tether.config import TrainConfig
    from tether.data import load_prompts
    from tether.rewards import load_reward
    from tether.rollout import SamplingParams
    from tether.state import TrainState
    from tether.trainer import batch_indices, build_policy, ppo_step, sampling_params

    os.environ[fastpath.STATIC_ENV_VAR] = "1" if decode == "static" else "0"
    group = args.group_size if estimator == "grpo" else 1
    batch = args.prompts * args.group_size  # the same completions a step for both estimators
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig.from_flat(
            policy=str(model_dir),
            reward=REWARD,
            prompts=f"jsonl:{PROMPTS}",
            out=tmp,
            steps=args.steps,
            batch_size=batch,
            group_size=group,
            advantage=estimator,
            mini_batch_size=args.mini_batch_size,
            ppo_epochs=1,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            lora_r=16,
            lora_alpha=32,
            dtype=args.dtype,
            device=args.device,
            progress=False,
        )
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        policy = build_policy(cfg)
        device = policy.device
        records = load_prompts(cfg.task.prompts)
        reward = load_reward(cfg.task.reward)
        state = TrainState.create(policy, cfg)
        sampling = sampling_params(cfg.sampling)
        rows = []
        for step in range(args.steps):
            rows.append(ppo_step(policy, reward, state, records, sampling, cfg, step))
            _sync(device)
        timed = rows[1:] or rows
        peak_mb = peak_memory_mb(device)

        def median(key: str) -> float:
            return statistics.median(r[key] for r in timed)

        # the prefill alone, on the last timed step's prompts: generate one token
        idx = batch_indices(len(records), batch // group, cfg.training.seed, args.steps - 1)
        prompts = [records[i].prompt for i in idx for _ in range(group)]
        one = SamplingParams(1, 1, sampling.temperature)
        prefill = []
        for _ in range(3):
            _sync(device)
            t = time.perf_counter()
            policy.generate(prompts, one)
            _sync(device)
            prefill.append(time.perf_counter() - t)
        prompt_len = policy.encode_prompts(prompts)[0].shape[1]
        base = policy.model.get_base_model()
        nbytes = decode_bytes(base, batch, prompt_len, args.new_tokens)
        gbps = copy_gbps(device, nbytes["weight_bytes"])
        gen_s = median("gen_seconds")
        decode_ms = 1e3 * (gen_s - statistics.median(prefill)) / max(args.new_tokens - 1, 1)
        floor_ms = 1e3 * (nbytes["weight_bytes"] + nbytes["kv_bytes"]) / (gbps * 1e9)
        step_s = median("step_seconds")
        return {
            "run": f"{args.model_names[model_dir]}:{estimator}:{decode}",
            "tool": "tether",
            "model": model_dir.name,
            "estimator": estimator,
            "decode": decode,
            "device": str(device),
            "dtype": args.dtype,
            "attention": base.config._attn_implementation,
            "llama_step": llama_step.applies(policy.model, sharded=False),
            "onednn": any("forward" in vars(m) for m in fastpath.frozen_linears(base)),
            "lora_dtypes": sorted({str(p.dtype) for p in policy.trainable_parameters()}),
            "params_m": sum(p.numel() for p in base.parameters()) / 1e6,
            "batch": batch,
            "group_size": group,
            "new_tokens": args.new_tokens,
            "response_len": statistics.mean(r["response_len_mean"] for r in rows),
            "prompt_len": prompt_len,
            "steps_timed": len(timed),
            "warmup_step_s": rows[0]["step_seconds"],
            "step_s": step_s,
            "phases": {p: median(f"{p}_seconds") for p in PHASES},
            "gen_s": gen_s,
            "prefill_s": statistics.median(prefill),
            "gen_tokens_per_s": batch * args.new_tokens / gen_s,
            "decode_ms": decode_ms,
            "floor_ms": floor_ms,
            "decode_over_floor": decode_ms / floor_ms,
            "copy_gbps": gbps,
            **{k: v / 2**20 for k, v in (("weight_mb", nbytes["weight_bytes"]),)},
            "kv_mb": nbytes["kv_bytes"] / 2**20,
            "peak_mb": peak_mb,
            "peak_kind": "GPU max_memory_allocated" if device.type == "cuda" else "peak RSS",
        }


def run_trl(args: argparse.Namespace, model_dir: Path) -> dict:
    """TRL 1.16's GRPOTrainer (benchmarks/peers/trl116_grpo.py) on the same shape, in its own
    process with this interpreter; skipped, with the reason, where trl 1.16 does not import."""
    label = f"{args.model_names[model_dir]}:trl:eager"
    python = args.trl_python or sys.executable
    probe = subprocess.run(
        [python, "-c", "import trl, datasets; print(trl.__version__)"],
        capture_output=True,
        text=True,
    )
    found = probe.stdout.strip()
    if probe.returncode or not found.startswith("1.16"):
        why = probe.stderr.strip().splitlines()[-1:] or [f"trl {found}, not 1.16"]
        return {"run": label, "tool": "trl", "skipped": f"TRL 1.16 does not import: {why[0]}"}
    argv = [
        python,
        str(ROOT / "benchmarks" / "peers" / "trl116_grpo.py"),
        f"--model={model_dir}",
        f"--prompts={PROMPTS}",
        f"--steps={args.steps}",
        f"--batch-size={args.prompts * args.group_size}",
        f"--max-new-tokens={args.new_tokens}",
        f"--mini-batch-size={args.mini_batch_size}",
        f"--group-size={args.group_size}",
        "--kl-coef=0.05",
        "--lora-r=16",
        "--lr=1e-5",
        f"--device={'cpu' if args.device == 'cpu' else 'cuda'}",
        f"--dtype={args.dtype}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_DISABLED": "true", "TQDM_DISABLE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "benchmarks" / "peers"), env.get("PYTHONPATH")) if p
    )
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode:
        return {"run": label, "tool": "trl", "failed": proc.stderr[-1500:]}
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    batch = args.prompts * args.group_size
    return {
        "run": label,
        "tool": "trl",
        "model": model_dir.name,
        "estimator": "grpo",
        "decode": "HF generate",
        "batch": batch,
        "new_tokens": args.new_tokens,
        "step_s": r["step_s"],
        "gen_s": r["gen_s"],
        "gen_tokens_per_s": batch * args.new_tokens / r["gen_s"],
        "response_len": r["response_len"],
        "peak_mb": r.get("peak_gpu_mb", r["peak_rss_mb"]),
        "peak_kind": "GPU max_memory_allocated" if "peak_gpu_mb" in r else "peak RSS",
        "versions": r["versions"],
    }


# ----------------------------------------------------------------------------------------------
# the runs
# ----------------------------------------------------------------------------------------------


def parse_runs(text: str) -> list[tuple[str, str, str]]:
    runs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3 or parts[0] not in MODELS:
            raise SystemExit(
                f"--runs: {item!r} is not MODEL:ESTIMATOR:DECODE ({', '.join(MODELS)})"
            )
        model, estimator, decode = parts
        if estimator not in ("grpo", "gae", "trl") or decode not in ("eager", "static"):
            raise SystemExit(f"--runs: {item!r}: estimator grpo|gae|trl, decode eager|static")
        runs.append((model, estimator, decode))
    return runs


def one_run(args: argparse.Namespace, model_dir: Path, estimator: str, decode: str) -> dict:
    if estimator == "trl":
        return run_trl(args, model_dir)
    if not args.spawn:
        return run_tether(args, model_dir, estimator, decode)
    # its own process: peak GPU memory and compiled graphs are this run's alone
    argv = [sys.executable, __file__, "--one", f"{model_dir}:{estimator}:{decode}"]
    for key in ("device", "dtype", "prompts", "group_size", "new_tokens", "mini_batch_size"):
        argv.append(f"--{key.replace('_', '-')}={getattr(args, key)}")
    argv.append(f"--steps={args.steps}")
    label = f"{args.model_names[model_dir]}:{estimator}:{decode}"
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"run": label, "tool": "tether", "failed": f"over --timeout {args.timeout} s"}
    if proc.returncode:
        return {"run": label, "tool": "tether", "failed": proc.stderr[-1500:]}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "run": label}


def benchmark(args: argparse.Namespace) -> dict:
    import torch

    start = time.perf_counter()
    runs = parse_runs(args.runs)
    results: list[dict] = []
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    record = {
        **provenance(),
        "gpu": gpu,
        "command": "python benchmarks/gpu_step.py " + " ".join(sys.argv[1:]),
        "cpu_mode": args.cpu,
        "device": args.device,
        "dtype": args.dtype,
        "prompts": args.prompts,
        "group_size": args.group_size,
        "new_tokens": args.new_tokens,
        "steps": args.steps,
        "runs": results,
        "complete": False,
    }
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for name in dict.fromkeys(m for m, _, _ in runs):
            dirs[name] = build_model_dir(name, args.cpu, args.device, args.dtype, Path(tmp))
        args.model_names = {path: name for name, path in dirs.items()}
        for model, estimator, decode in runs:
            label = f"{model}:{estimator}:{decode}"
            if time.perf_counter() - start > args.budget:
                results.append({"run": label, "skipped": f"over --budget {args.budget} s"})
                continue
            if estimator == "trl" and dirs[model].name == MODELS["t5"]:
                results.append({"run": label, "skipped": "TRL's GRPOTrainer is causal-only"})
                continue
            t = time.perf_counter()
            r = one_run(args, dirs[model], estimator, decode)
            r["wall_s"] = time.perf_counter() - t
            results.append(r)
            print(summary_line(r), file=sys.stderr, flush=True)
            save(args.save, {**record, "wall_s": time.perf_counter() - start})
    record.update(complete=True, wall_s=time.perf_counter() - start)
    save(args.save, record)
    return record


def save(path: Path | None, record: dict) -> None:
    """The results so far (after every run: a run that is killed keeps the ones before it)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")


def summary_line(r: dict) -> str:
    if "step_s" not in r:
        return f"{r['run']}: {r.get('skipped') or 'FAILED ' + r.get('failed', '')[-400:]}"
    return f"{r['run']}: {r['step_s']:.3f} s/step, {r['gen_tokens_per_s']:.0f} gen tok/s"


def print_results(record: dict, markdown: bool = False) -> None:
    where = record.get("gpu") or record["machine"]
    print(measured_line({**record, "machine": where}) + ("\n" if markdown else ""))
    rows = []
    for r in record["runs"]:
        if "step_s" not in r:
            rows.append((r["run"], *["-"] * 9, r.get("skipped") or "failed"))
            continue
        ph = r.get("phases", {})
        rows.append(
            (
                r["run"],
                f"{r['step_s']:.3f}",
                f"{r['gen_s']:.3f}",
                *(f"{ph[p]:.3f}" if p in ph else "-" for p in ("forward", "update")),
                f"{r['decode_ms']:.2f}" if "decode_ms" in r else "-",
                f"{r['floor_ms']:.3f}" if "floor_ms" in r else "-",
                f"{r['decode_over_floor']:.1f}x" if "decode_over_floor" in r else "-",
                f"{r['gen_tokens_per_s']:.0f}",
                f"{r['peak_mb']:.0f}",
                "",
            )
        )
    headers = (
        "run",
        "s/step",
        "gen s",
        "fwd s",
        "update s",
        "decode ms/tok",
        "floor ms",
        "vs floor",
        "gen tok/s",
        "peak MB",
        "note",
    )
    print(table(headers, rows, markdown))
    first = next((r for r in record["runs"] if "copy_gbps" in r), None)
    if first:
        print(
            f"\n({record['device']}, {record['dtype']} base, LoRA r16 fp32; {record['prompts']} "
            f"prompts x {record['group_size']} completions (gae: as many prompts, one each), "
            f"{record['new_tokens']} new tokens; median of {record['steps'] - 1} steps after a "
            f"warm-up; copy bandwidth {first['copy_gbps']:.0f} GB/s; peak MB is "
            f"{first['peak_kind']}; attention {first['attention']})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cpu", action="store_true", help="tiny models on the CPU, in-process")
    parser.add_argument("--runs", help=f"MODEL:ESTIMATOR:DECODE,... (default: {RUNS})")
    parser.add_argument("--device", help="default: cuda (cpu with --cpu)")
    parser.add_argument("--dtype", help="the base's dtype; default bfloat16 (float32 with --cpu)")
    parser.add_argument("--prompts", type=int, help="prompts a step (default 8; 2 with --cpu)")
    parser.add_argument("--group-size", type=int, help="completions a prompt (8; 2 with --cpu)")
    parser.add_argument("--new-tokens", type=int, help="exactly this many (256; 8 with --cpu)")
    parser.add_argument("--mini-batch-size", type=int, help="(16; 2 with --cpu)")
    parser.add_argument("--steps", type=int, default=3, help="including one warm-up step")
    parser.add_argument("--budget", type=float, default=1e9, help="seconds; later runs skip")
    parser.add_argument("--timeout", type=float, default=600, help="seconds, each spawned run")
    parser.add_argument(
        "--spawn", action="store_true", help="each run in its own process (the default off --cpu)"
    )
    parser.add_argument("--trl-python", help="the interpreter for TRL (default: this one)")
    parser.add_argument("--save", type=Path, help="write the results as JSON")
    parser.add_argument("--show", type=Path, help="print a results file")
    parser.add_argument("--markdown", action="store_true", help="with --show")
    parser.add_argument(
        "--write-model",
        metavar="NAME:DIR",
        help="only write a random-init model dir (NAME a config's short name) into DIR, e.g. for "
        "`tether train --policy DIR/flan-t5-base`",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # (internal) DIR:ESTIMATOR:DECODE
    args = parser.parse_args()
    if args.show:
        print_results(json.loads(args.show.read_text()), args.markdown)
        return
    tiny = args.cpu
    defaults = dict(
        device="cpu" if tiny else "cuda",
        dtype="float32" if tiny else "bfloat16",
        prompts=2 if tiny else 8,
        group_size=2 if tiny else 8,
        new_tokens=8 if tiny else 256,
        mini_batch_size=2 if tiny else 16,
        runs=RUNS,
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.spawn = args.spawn or not tiny
    if args.write_model:
        name, _, out = args.write_model.partition(":")
        if name not in MODELS or not out:
            raise SystemExit(
                f"--write-model {args.write_model!r}: NAME:DIR, NAME one of {list(MODELS)}"
            )
        print(build_model_dir(name, tiny, args.device, args.dtype, Path(out)))
        return
    if args.one:
        path, estimator, decode = args.one.rsplit(":", 2)
        args.model_names = {Path(path): Path(path).name}
        print(json.dumps(run_tether(args, Path(path), estimator, decode)))
        return
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("gpu_step.py: no CUDA device here; --cpu runs the tiny CPU version")
    record = benchmark(args)
    print_results(record)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
