"""`tether detox`: the "make summaries less toxic" recipe, measured properly.

(1) baseline: the starting policy on N held-out prompts -> (2) PPO on the training split
-> (3) aligned: the same N prompts, decoding and seeds -> (4) report.json + report.html
-> (5) a terminal summary. The proxy reward and the gold judge are different models.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from tether.config import DetoxConfig, config_to_yaml
from tether.data import PromptRecord, load_prompts
from tether.evaluate import Embedder, Metric, evaluate, text_metric
from tether.policy import Policy
from tether.report import EVAL_DIR, RUN_INFO, write_report
from tether.rewards import RewardModel, load_reward
from tether.rundir import RunDir, atomic_write_text
from tether.trainer import build_policy, sampling_params, train, warn


@dataclasses.dataclass
class DetoxResult:
    run_dir: Path
    report: dict[str, Any]


def heldout_records(cfg: DetoxConfig) -> list[PromptRecord]:
    """The first `eval_prompts` of the held-out split (hash-ordered, so a random sample)."""
    records = load_prompts(cfg.prompts, "heldout", cfg.heldout_fraction)
    if len(records) < cfg.eval_prompts:
        warn(
            f"{cfg.prompts} holds only {len(records)} held-out prompts; evaluating all of them, not {cfg.eval_prompts}"
        )
    return records[: cfg.eval_prompts]


def run_eval(
    policy: Policy,
    records: list[PromptRecord],
    metrics: list[Metric],
    embedder: Embedder | None,
    cfg: DetoxConfig,
    as_reference: bool,
    path: Path,
    desc: str,
) -> list[dict[str, Any]]:
    """Evaluate and write one JSONL row per prompt (atomically)."""
    rows = evaluate(
        policy,
        records,
        sampling_params(cfg),
        metrics,
        embedder,
        cfg.eval_batch_size,
        cfg.eval_seed,
        as_reference=as_reference,
        desc=desc,
        progress=cfg.progress,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def detox(
    cfg: DetoxConfig, reward: RewardModel | None = None, judge: RewardModel | None = None
) -> DetoxResult:
    t_start = time.perf_counter()
    run = RunDir(cfg.out)
    config_yaml = config_to_yaml(cfg)
    # everything that can fail on user input fails before any compute is spent
    reward = reward or load_reward(cfg.reward)
    judge = judge or load_reward(cfg.judge)
    train_records = load_prompts(cfg.prompts, "train", cfg.heldout_fraction)
    eval_records = heldout_records(cfg)
    embedder = Embedder() if cfg.similarity else None
    run.prepare(config_yaml, cfg.resume)
    policy = build_policy(cfg)
    proxy_metric, judge_metric = text_metric(reward), text_metric(judge)
    metrics = [proxy_metric, judge_metric]
    timing: dict[str, float] = {}

    # 1. baseline: the starting policy (adapter disabled), unless a resumed run already has it
    baseline_path = run.root / EVAL_DIR / "baseline.jsonl"
    t0 = time.perf_counter()
    if not (cfg.resume and baseline_path.is_file()):
        run_eval(policy, eval_records, metrics, embedder, cfg, True, baseline_path, "baseline")
    timing["baseline"] = time.perf_counter() - t0

    # 2. PPO; the batch means of both toxicities are logged each step
    t0 = time.perf_counter()
    monitors = {
        _monitor_name(role, m): m.fn
        for role, m in (("proxy", proxy_metric), ("judge", judge_metric))
    }
    train(
        cfg, reward=reward, policy=policy, records=train_records, monitors=monitors, prepared=True
    )
    timing["ppo"] = time.perf_counter() - t0

    # 3. aligned: the same prompts, decoding and seeds
    t0 = time.perf_counter()
    run_eval(
        policy,
        eval_records,
        metrics,
        embedder,
        cfg,
        False,
        run.root / EVAL_DIR / "aligned.jsonl",
        "aligned",
    )
    timing["aligned"] = time.perf_counter() - t0
    timing["total"] = time.perf_counter() - t_start

    # 4-5. report
    info = {
        "proxy_metric": proxy_metric.name,
        "proxy_lower_is_better": proxy_metric.lower_is_better,
        "judge_metric": judge_metric.name,
        "judge_lower_is_better": judge_metric.lower_is_better,
        "reference": "starting policy: the base model with the PPO adapter disabled"
        + (f" (starting adapter {cfg.adapter} merged in)" if cfg.adapter else ""),
        "evaluated_adapter": str(run.root / "final"),
        "decoding": dataclasses.asdict(sampling_params(cfg)),
        "eval_seed": cfg.eval_seed,
        "timing_seconds": timing,
    }
    atomic_write_text(run.root / RUN_INFO, json.dumps(info, indent=2))
    report = write_report(run.root)
    print(f"report: {run.root / 'report.html'}", file=sys.stderr)
    return DetoxResult(run.root, report)


def _monitor_name(role: str, metric: Metric) -> str:
    """metrics.jsonl key: proxy_toxicity / judge_toxicity, or *_score for a reward-like metric."""
    return f"{role}_{'toxicity' if metric.lower_is_better else 'score'}"
