"""`tether detox`: the "make summaries less toxic" recipe, measured properly; and `tether eval`.

detox: (1) baseline: the starting policy on N held-out prompts -> (2) PPO on the training split
-> (3) aligned: the same N prompts, decoding and seeds -> (4) report.json + report.html
-> (5) a terminal summary. The proxy reward and the gold judge are different models.
eval: steps 1 and 3 alone, for any policy and a trained adapter directory.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tether import distributed
from tether.config import DetoxConfig, EvalConfig
from tether.data import PromptRecord, load_prompts
from tether.errors import TetherError, warn
from tether.evaluate import Embedder, Metric, evaluate, length_controlled, text_metric
from tether.options import config_to_yaml
from tether.policy import Policy
from tether.report import EVAL_DIR, LENGTH_CONTROLLED, RUN_INFO, TRANSFER, write_report
from tether.rewards import RewardModel, load_reward
from tether.rundir import CONFIG, RunDir, atomic_write_text, write_jsonl
from tether.tracking import check_tracker
from tether.trainer import build_policy, load_policy, sampling_params, train


@dataclasses.dataclass
class DetoxResult:
    run_dir: Path
    report: dict[str, Any] | None  # None for an eval without a trained adapter
    baseline: list[dict[str, Any]]


@dataclasses.dataclass
class _Setup:
    """What both commands load before spending any compute: user mistakes fail here."""

    run: RunDir
    metrics: list[Metric]  # [proxy, judge]
    eval_records: list[PromptRecord]
    embedder: Embedder | None
    transfer_spec: str | None = None  # the second held-out pool, if any
    transfer_records: list[PromptRecord] = dataclasses.field(default_factory=list)


def transfer_spec(prompts: str, option: str) -> str | None:
    """The second pool's prompt spec: `option`, or for auto the rest of a chosen pool."""
    if option == "none":
        return None
    if option == "auto":
        return "chitchat:rest" if prompts == "chitchat:toxic" else None
    return option


def _transfer_records(cfg: DetoxConfig, spec: str) -> list[PromptRecord]:
    """`transfer_eval_prompts` held-out prompts of `spec` drawn at random (by the eval seed),
    none of them a prompt of the run's own pool."""
    if spec == cfg.task.prompts:
        raise TetherError(
            f"--transfer-prompts {spec} is the run's own --prompts: give another pool, or none"
        )
    own = {r.prompt for r in load_prompts(cfg.task.prompts, "all", cfg.task.heldout_fraction)}
    records = load_prompts(spec, "heldout", cfg.task.heldout_fraction)
    records = [r for r in records if r.prompt not in own]
    if not records:
        raise TetherError(f"--transfer-prompts {spec}: every held-out prompt is in --prompts")
    n = min(cfg.eval.transfer_eval_prompts, len(records))
    return random.Random(cfg.eval.eval_seed).sample(records, n)


def _setup(cfg: DetoxConfig, reward: RewardModel, judge: RewardModel) -> _Setup:
    records = load_prompts(cfg.task.prompts, "heldout", cfg.task.heldout_fraction)
    if len(records) < cfg.eval.eval_prompts:
        warn(
            f"{cfg.task.prompts} holds only {len(records)} held-out prompts; "
            f"evaluating all of them, not {cfg.eval.eval_prompts}"
        )
    spec = transfer_spec(cfg.task.prompts, cfg.eval.transfer_prompts)
    transfer = _transfer_records(cfg, spec) if spec else []
    embedder = Embedder() if cfg.eval.similarity else None
    run = RunDir(distributed.run_root(cfg.run.out))  # rank 0's is --out, see distributed.py
    metrics = [text_metric(reward), text_metric(judge)]
    return _Setup(run, metrics, records[: cfg.eval.eval_prompts], embedder, spec, transfer)


def _run_eval(
    policy: Policy, setup: _Setup, cfg: DetoxConfig, as_reference: bool, name: str
) -> list[dict[str, Any]]:
    """Evaluate the held-out prompts (the second pool's for a name that starts with TRANSFER)
    and write eval/NAME.jsonl, one row per completion (atomically)."""
    rows = evaluate(
        policy,
        setup.transfer_records if name.startswith(TRANSFER) else setup.eval_records,
        sampling_params(cfg.sampling),
        setup.metrics,
        setup.embedder,
        cfg.eval.eval_batch_size,
        cfg.eval.eval_seed,
        as_reference=as_reference,
        desc=name,
        progress=cfg.run.progress,
        samples=cfg.eval.eval_samples,
    )
    path = setup.run.root / EVAL_DIR / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, rows)
    return rows


def _length_controlled(
    setup: _Setup, baseline: list[dict[str, Any]], aligned: list[dict[str, Any]], prefix: str = ""
) -> None:
    """eval/{prefix}length_controlled.jsonl: each toxicity of both completions cut to the
    shorter."""
    toxicities = [m for m in setup.metrics if m.lower_is_better]
    rows = length_controlled(baseline, aligned, toxicities)
    write_jsonl(setup.run.root / EVAL_DIR / f"{prefix}{LENGTH_CONTROLLED}", rows)


def _baselines(
    policy: Policy, setup: _Setup, cfg: DetoxConfig, resume: bool = False
) -> dict[str, list[dict[str, Any]]]:
    """The starting policy on each pool, or the rows a resumed run already has."""
    out = {}
    for prefix in ("", TRANSFER) if setup.transfer_records else ("",):
        path = setup.run.root / EVAL_DIR / f"{prefix}baseline.jsonl"
        # rank 0's run directory decides: with several processes every one evaluates, or none
        rows = distributed.on_main(lambda p=path: _saved_rows(p)) if resume else None
        if rows is None:
            rows = _run_eval(policy, setup, cfg, as_reference=True, name=f"{prefix}baseline")
        out[prefix] = rows
    return out


def _aligned(
    policy: Policy, setup: _Setup, cfg: DetoxConfig, baselines: dict[str, list[dict[str, Any]]]
) -> None:
    """The trained policy on each pool, with the length-controlled rescoring of each pair."""
    for prefix, baseline in baselines.items():
        aligned = _run_eval(policy, setup, cfg, as_reference=False, name=f"{prefix}aligned")
        _length_controlled(setup, baseline, aligned, prefix)


def _finish(setup: _Setup, cfg: DetoxConfig, adapter: str, timing: dict[str, float]) -> dict:
    """run_info.json (what the report needs beyond the rows), then report.json/html."""
    proxy, judge = setup.metrics
    info = {
        "proxy_metric": proxy.name,
        "proxy_lower_is_better": proxy.lower_is_better,
        "judge_metric": judge.name,
        "judge_lower_is_better": judge.lower_is_better,
        "reference": "starting policy: the base model with the PPO adapter disabled"
        + (f" (starting adapter {cfg.model.adapter} merged in)" if cfg.model.adapter else ""),
        "evaluated_adapter": adapter,
        "decoding": dataclasses.asdict(sampling_params(cfg.sampling)),
        "eval_seed": cfg.eval.eval_seed,
        "toxicity_threshold": cfg.eval.toxicity_threshold,
        "transfer_prompts": setup.transfer_spec,
        "timing_seconds": timing,
    }
    atomic_write_text(setup.run.root / RUN_INFO, json.dumps(info, indent=2))
    report = write_report(setup.run.root)
    if distributed.is_main():
        print(f"report: {setup.run.root / 'report.html'}", file=sys.stderr)
    return report


def detox(
    cfg: DetoxConfig, reward: RewardModel | None = None, judge: RewardModel | None = None
) -> DetoxResult:
    t_start = time.perf_counter()
    check_tracker(cfg.training.report_to)
    distributed.check_supported()
    reward = reward or load_reward(cfg.task.reward, cfg.model.device, **cfg.model.load_safety())
    judge = judge or load_reward(cfg.task.judge, cfg.model.device, **cfg.model.load_safety())
    train_records = load_prompts(cfg.task.prompts, "train", cfg.task.heldout_fraction)
    setup = _setup(cfg, reward, judge)
    setup.run.check(config_to_yaml(cfg), cfg.training.resume, cfg.training.force)
    policy = build_policy(cfg)  # a model that does not load leaves no run directory behind
    setup.run.prepare(config_to_yaml(cfg), cfg.training.resume, cfg.training.force)
    timing: dict[str, float] = {}

    # 1. baseline: the starting policy (adapter disabled) on each pool, unless a resumed run
    # already has it
    t0 = time.perf_counter()
    baselines = _baselines(policy, setup, cfg, resume=cfg.training.resume)
    timing["baseline"] = time.perf_counter() - t0

    # 2. PPO on the training split; both toxicities logged as batch means every step
    t0 = time.perf_counter()
    monitors = {
        _monitor_name(r, m): m.fn for r, m in zip(("proxy", "judge"), setup.metrics, strict=True)
    }
    train(cfg, reward, policy, train_records, monitors, prepared=True, judge=judge)
    timing["ppo"] = time.perf_counter() - t0

    # 3. aligned: the same prompts, decoding and seeds
    t0 = time.perf_counter()
    _aligned(policy, setup, cfg, baselines)
    timing["aligned"] = time.perf_counter() - t0
    timing["total"] = time.perf_counter() - t_start

    # 4-5. report
    report = _finish(setup, cfg, str(setup.run.root / "final"), timing)
    return DetoxResult(setup.run.root, report, baselines[""])


def evaluate_adapter(cfg: EvalConfig) -> DetoxResult:
    """Baseline (starting policy) and, with `cfg.trained`, that adapter on the same prompts."""
    t_start = time.perf_counter()
    setup = _setup(
        cfg,
        load_reward(cfg.task.reward, cfg.model.device, **cfg.model.load_safety()),
        load_reward(cfg.task.judge, cfg.model.device, **cfg.model.load_safety()),
    )
    if cfg.trained is not None:
        cfg = _with_adapter_shape(cfg, Path(cfg.trained))
    setup.run.prepare_eval(config_to_yaml(cfg))
    # evaluation needs no critic; `tether eval` has no --seed: the adapter it scores is loaded
    # over LoRA's seeded A matrices (or disabled for the baseline)
    policy = load_policy(cfg.model, cfg.sampling, seed=0, value_head=False)
    timing = {}
    t0 = time.perf_counter()
    baselines = _baselines(policy, setup, cfg)
    timing["baseline"] = time.perf_counter() - t0
    if cfg.trained is None:
        return DetoxResult(setup.run.root, None, baselines[""])
    policy.load_trainable(cfg.trained)
    t0 = time.perf_counter()
    _aligned(policy, setup, cfg, baselines)
    timing["aligned"] = time.perf_counter() - t0
    timing["total"] = time.perf_counter() - t_start
    return DetoxResult(setup.run.root, _finish(setup, cfg, cfg.trained, timing), baselines[""])


def _with_adapter_shape(cfg: EvalConfig, trained: Path) -> EvalConfig:
    """The LoRA rank/alpha/targets of a saved adapter, so its weights load into the policy."""
    try:
        saved = json.loads((trained / "adapter_config.json").read_text())
    except (OSError, ValueError):
        raise TetherError(f"--trained {trained}: no readable adapter_config.json there") from None
    if not (trained / "adapter_model.safetensors").is_file():
        raise TetherError(
            f"--trained {trained}: not a tether adapter dir (adapter_model.safetensors missing)"
        )
    _check_same_start(cfg, trained)
    targets = saved.get("target_modules")
    return cfg.replace(
        lora_r=int(saved["r"]),
        lora_alpha=int(saved["lora_alpha"]),
        lora_target_modules=sorted(targets) if isinstance(targets, list | set) else None,
    )


def _check_same_start(cfg: EvalConfig, trained: Path) -> None:
    """A PPO adapter only means something on the policy it was trained from: with a starting
    (SFT) adapter merged in, evaluating it without that merge would score a different model."""
    try:
        run_cfg = yaml.safe_load((trained / CONFIG).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return  # an adapter dir from elsewhere: nothing to compare with
    started_from = run_cfg.get("adapter")
    if started_from != cfg.model.adapter:
        fix = f"pass --adapter {started_from}" if started_from else "drop --adapter"
        raise TetherError(
            f"--trained {trained} was trained from starting adapter {started_from} (its "
            f"{CONFIG}), but this eval starts from {cfg.model.adapter}: {fix}"
        )


def _saved_rows(path: Path) -> list[dict[str, Any]] | None:
    """The rows of an evaluation a resumed run already wrote, None when there are none."""
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines()]


def _monitor_name(role: str, metric: Metric) -> str:
    """metrics.jsonl key: proxy_toxicity / judge_toxicity, or *_score for a reward-like metric."""
    return f"{role}_{'toxicity' if metric.lower_is_better else 'score'}"
