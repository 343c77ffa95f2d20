"""The measurements behind tether's CPU-specific choices, each against the plain alternative,
side by side in one process on the embedded SmolLM2-135M (fp32):

    python benchmarks/cpu_choices.py            # all of them (a few minutes on 2 cores)
    python benchmarks/cpu_choices.py --only linears,sampler

- `linears`: every frozen linear layer of the model (the 210 of the 30 blocks, and the
  vocabulary-wide lm_head) through oneDNN's linear (`fastpath.frozen_linear`) against torch's
  `F.linear`, at 16 rows (a decoding step of batch 16), 196 rows (an update micro-batch of
  2 x 98 positions) and 752 rows (a prefill of 16 x 47 prompt tokens), forward; and the
  input's gradient at 196 rows (the update's backward).
- `step`: a 16 x 48-token rollout (`Policy.generate`) by the Llama decoding step
  (`tether.llama_step`) against generate() through the model's own forward over the same
  sampler, same layers (TETHER_LLAMA_STEP=0).
- `sampler`: one sampling step of 16 x vocabulary rows by inverse CDF (`fastpath.StepSampler`: one
  uniform per row) against `torch.multinomial` on the softmax (what `generate(do_sample=True)`
  does), plus the log-prob and entropy StepSampler records.
- `fold`: the same rollout by the Llama step with the LoRA adapter (tether's default: r 16 on
  q/v) folded into the base weights while decoding (`llama_step.folded_lora`) against LoRA's own
  layers, which run two small matmuls beside each adapted one.
- `judge`: HateSonar's ONNX session scoring 200 texts with one thread against onnxruntime's
  default pool.

The update's micro-batch size and glibc's `malloc_trim` between phases are measured on whole
PPO steps by `benchmarks/ppo_step.py --memory`. Every figure is the median of repeated runs; the
machine's other load shows in all of them, so read the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from results_io import measured_line, provenance, table


def median_seconds(fn: Callable[[], object], repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_linears(policy, repeat: int) -> list[tuple[str, float, float]]:
    from tether.fastpath import frozen_linear, frozen_linears

    base = policy.model.get_base_model()
    head = base.get_output_embeddings()
    layers = [m for m in frozen_linears(base) if m is not head]
    rows = []
    for group, modules in ((f"{len(layers)} block layers", layers), ("lm_head", [head])):
        for n, what in (
            (16, "a decoding step"),
            (196, "an update micro-batch"),
            (752, "a prefill"),
        ):
            xs = [torch.randn(n, m.in_features) for m in modules]

            def plain(xs=xs, modules=modules) -> None:
                for x, m in zip(xs, modules, strict=True):
                    torch.nn.functional.linear(x, m.weight)

            def onednn(xs=xs, modules=modules) -> None:
                for x, m in zip(xs, modules, strict=True):
                    frozen_linear(m, x)

            label = f"{group}, {n} rows ({what}): F.linear vs oneDNN"
            rows.append((label, median_seconds(plain, repeat), median_seconds(onednn, repeat)))
    # the update's backward: the input's gradient, grad @ W against oneDNN's linear with W^T
    grads = [torch.randn(196, m.out_features) for m in layers]

    def grad_plain() -> None:
        for g, m in zip(grads, layers, strict=True):
            g @ m.weight

    def grad_onednn() -> None:
        for g, m in zip(grads, layers, strict=True):
            frozen_linear(_transposed(m), g)

    label = f"{len(layers)} block layers, 196 rows, input gradient: grad @ W vs oneDNN"
    rows.append((label, median_seconds(grad_plain, repeat), median_seconds(grad_onednn, repeat)))
    return rows


def _transposed(layer: torch.nn.Linear) -> torch.nn.Linear:
    """A frozen layer whose weight is the transposed view of `layer`'s (what the backward of
    `fastpath.frozen_linear` multiplies by)."""
    out = torch.nn.Linear(1, 1, bias=False).requires_grad_(False)
    out.weight = torch.nn.Parameter(layer.weight.t(), requires_grad=False)
    return out


def bench_sampler(policy, repeat: int) -> list[tuple[str, float, float]]:
    from tether.fastpath import StepSampler
    from tether.rollout import SamplingParams

    vocab = policy.model.get_base_model().config.vocab_size
    scores = torch.randn(16, vocab) * 3
    ids = torch.zeros(16, 1, dtype=torch.long)

    def multinomial() -> None:
        logits = scores.float()
        torch.multinomial(torch.softmax(logits, -1), 1)

    def inverse_cdf() -> None:
        StepSampler(SamplingParams(max_new_tokens=48), 1.0, [0])(ids, scores)

    label = f"sampling step, 16 x {vocab}: multinomial vs inverse CDF (+ log-prob, entropy)"
    return [(label, median_seconds(multinomial, repeat), median_seconds(inverse_cdf, repeat))]


def rollout_seconds(policy, reps: int, env: dict[str, str] | None = None, **replaced) -> float:
    """Median seconds of a 16 x 48-token rollout (`Policy.generate`, the fast path), with the
    environment `env` and the attributes `replaced` of tether.llama_step swapped in for the
    run."""
    import os

    import tether.llama_step
    from tether.data import load_prompts
    from tether.rollout import SamplingParams

    prompts = [r.prompt for r in load_prompts("jsonl:examples/prompts.jsonl")[:16]]
    sampling = SamplingParams(max_new_tokens=48, min_new_tokens=48)

    def run() -> None:
        saved = {name: getattr(tether.llama_step, name) for name in replaced}
        saved_env = {k: os.environ.get(k) for k in env or {}}
        for name, value in replaced.items():
            setattr(tether.llama_step, name, value)
        os.environ.update(env or {})
        try:
            torch.manual_seed(0)
            policy.generate(prompts, sampling)
        finally:
            for name, value in saved.items():
                setattr(tether.llama_step, name, value)
            for k, v in saved_env.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)

    return median_seconds(run, reps, warmup=1)


def bench_fold(policy, repeat: int) -> list[tuple[str, float, float]]:
    @contextlib.contextmanager
    def beside(model):  # LoRA's own layers: base matmul + the two adapter matmuls
        yield

    reps = max(1, repeat // 10)
    unfolded = rollout_seconds(policy, reps, folded_lora=beside)
    folded = rollout_seconds(policy, reps)
    label = "rollout 16 x 48 tokens, the Llama step: LoRA beside each layer vs folded in"
    return [(label, unfolded, folded)]


def bench_step(policy, repeat: int) -> list[tuple[str, float, float]]:
    from tether.llama_step import ENV_VAR

    reps = max(1, repeat // 10)
    forward = rollout_seconds(policy, reps, env={ENV_VAR: "0"})
    step = rollout_seconds(policy, reps, env={ENV_VAR: "1"})
    label = "rollout 16 x 48 tokens: generate() through the model's forward vs the Llama step"
    return [(label, forward, step)]


def bench_judge(repeat: int) -> list[tuple[str, float, float]]:
    import onnxruntime as ort
    from hatesonar.api import DEFAULT_MODEL_FILE

    from tether.rewards.hatesonar import HateSonarJudge

    judge = HateSonarJudge()
    texts = [f"summary number {i}: they talked about the weather and the game" for i in range(200)]
    one = median_seconds(lambda: judge.score([""] * len(texts), texts), max(1, repeat // 5))
    pooled = ort.SessionOptions()
    pooled.log_severity_level = 4
    judge._session = ort.InferenceSession(
        str(DEFAULT_MODEL_FILE), pooled, providers=["CPUExecutionProvider"]
    )
    pool = median_seconds(lambda: judge.score([""] * len(texts), texts), max(1, repeat // 5))
    return [("HateSonar, 200 texts: default thread pool vs one thread", pool, one)]


def print_rows(record: dict, markdown: bool = False) -> None:
    """The table of a results record: each choice, plain vs tether's, and the speed-up."""
    print(measured_line(record) + ("\n" if markdown else ""))
    print(f"torch {record['torch']}, {record['threads']} threads; median of repeats\n")
    headers = ("choice: plain vs tether", "plain ms", "tether ms", "speed-up")
    body = [
        (
            r["choice"],
            f"{1e3 * r['plain_s']:.1f}",
            f"{1e3 * r['tether_s']:.1f}",
            f"{r['plain_s'] / r['tether_s']:.2f}x",
        )
        for r in record["rows"]
    ]
    print(table(headers, body, markdown))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="linears,sampler,step,fold,judge")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--save", metavar="FILE.json", help="also write the figures as JSON")
    parser.add_argument("--show", metavar="FILE.json", help="print a saved table, and stop")
    parser.add_argument("--markdown", action="store_true", help="with --show: a Markdown table")
    args = parser.parse_args()
    if args.show:
        print_rows(json.loads(Path(args.show).read_text()), args.markdown)
        return
    wanted = set(args.only.split(","))
    rows: list[tuple[str, float, float]] = []
    policy = None
    if wanted & {"linears", "sampler", "step", "fold"}:
        from tether.models import load_model
        from tether.policy import Policy

        policy = Policy(load_model("smollm2"), value_head=False)
    with torch.no_grad():
        if "linears" in wanted:
            rows += bench_linears(policy, args.repeat)
        if "sampler" in wanted:
            rows += bench_sampler(policy, args.repeat)
    if "step" in wanted:
        rows += bench_step(policy, args.repeat)
    if "fold" in wanted:
        rows += bench_fold(policy, args.repeat)
    if "judge" in wanted:
        rows += bench_judge(args.repeat)
    record = {
        **provenance(),
        "command": "python benchmarks/cpu_choices.py " + " ".join(sys.argv[1:]),
        "threads": torch.get_num_threads(),
        "rows": [{"choice": c, "plain_s": p, "tether_s": t} for c, p, t in rows],
    }
    print_rows(record)
    if args.save:
        Path(args.save).write_text(json.dumps(record, indent=2))
        print(f"figures: {args.save}")


if __name__ == "__main__":
    main()
