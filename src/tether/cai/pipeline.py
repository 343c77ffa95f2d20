"""The CAI pipeline in one directory: one subdirectory per stage, each finished by a `DONE` file
written atomically last, so `tether cai run` skips what is finished and redoes only what is not.
Rerunning one stage by itself (`tether cai sft ...`) removes the DONE of every later stage:
their inputs changed.

    DIR/config.yaml, DIR/prompts.json      the resolved config; the prompt splits used
    DIR/revise/revisions.jsonl             stage 1: every critique and revision
    DIR/sft/adapter/                       stage 2: the SL-CAI LoRA adapter
    DIR/feedback/pairs.jsonl               stage 3: AI-labelled pairs (train-rm format)
    DIR/pm/model/                          stage 4: the preference model (reward pm:DIR/pm/model)
    DIR/rl/run/                            stage 5: the PPO run (final/ = RL-CAI adapter)
    DIR/eval/report.json, report.html      stage 6: base vs SL-CAI vs RL-CAI
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tether.cai import evaluate as cai_eval
from tether.cai.chat import ChatModel
from tether.cai.constitution import load_constitution
from tether.cai.feedback import ai_feedback
from tether.cai.redteam import harmless_prompts, load_redteam, split_prompts
from tether.cai.revise import revise
from tether.cai.sft import train_sl_cai
from tether.config import CaiConfig, RewardModelConfig, TrainConfig
from tether.errors import TetherError
from tether.models import load_model, merge_adapter, resolve_device
from tether.option_groups import (
    GuardOptions,
    ModelOptions,
    RunOptions,
    SamplingOptions,
    TaskOptions,
    TrainingOptions,
)
from tether.options import config_to_yaml
from tether.rewards import load_reward
from tether.rundir import RunDir, atomic_dir, atomic_write_text, read_jsonl, write_jsonl

STAGES = ("revise", "sft", "feedback", "train-pm", "rl", "eval")
DONE = "DONE"


def stage_dir(cfg: CaiConfig, stage: str) -> Path:
    return Path(cfg.out) / {"train-pm": "pm"}.get(stage, stage)


def is_done(cfg: CaiConfig, stage: str) -> bool:
    return (stage_dir(cfg, stage) / DONE).is_file()


def _needs(cfg: CaiConfig, stage: str) -> Path:
    """The finished stage directory that a later stage reads, or one line saying what to run."""
    if not is_done(cfg, stage):
        raise TetherError(
            f"{stage_dir(cfg, stage)} is not finished: run `tether cai {stage} --out {cfg.out}` "
            f"(or `tether cai run --out {cfg.out}`) first"
        )
    return stage_dir(cfg, stage)


def prompt_sets(cfg: CaiConfig) -> dict[str, list[str]]:
    """train (the stages' red-team prompts), heldout (evaluation), harmless (helpfulness)."""
    train, heldout = split_prompts(load_redteam(cfg.redteam), cfg.heldout_fraction)
    rng = random.Random(cfg.seed)  # a seeded draw, so the own and jailbreak sets both appear
    return {
        "train": rng.sample(train, min(cfg.train_prompts, len(train))),
        "heldout": heldout[: cfg.eval_prompts],
        "harmless": harmless_prompts()[: cfg.eval_harmless],
    }


def _chat(cfg: CaiConfig, spec: str, adapters: list[Path] = ()) -> ChatModel:
    """A model with the given adapters merged in, in order (SL-CAI = base + SFT adapter; RL-CAI
    = SL-CAI + PPO's adapter, which was trained on top of the merged SFT model)."""
    torch.manual_seed(cfg.seed)
    loaded = load_model(spec, device=resolve_device(cfg.device))
    for adapter in adapters:
        loaded.model = merge_adapter(loaded.model, adapter, what="stage adapter")
    return ChatModel(loaded)


# ----------------------------------------------------------------------------------------------
# the stages: each reads earlier stage dirs, fills its own, returns a summary for DONE
# ----------------------------------------------------------------------------------------------


def stage_revise(cfg: CaiConfig, out: Path) -> dict[str, Any]:
    chat = _chat(cfg, cfg.policy)
    rows = revise(
        chat,
        prompt_sets(cfg)["train"],
        load_constitution(cfg.constitution),
        cfg.revision_rounds,
        cfg.max_new_tokens,
        cfg.temperature,
        cfg.seed,
        cfg.generation_batch_size,
        cfg.progress,
    )
    write_jsonl(out / "revisions.jsonl", rows)
    return {"prompts": len(rows), "empty_revisions": sum(r["empty_revisions"] for r in rows)}


def stage_sft(cfg: CaiConfig, out: Path) -> dict[str, Any]:
    rows = read_jsonl(_needs(cfg, "revise") / "revisions.jsonl")
    loaded = load_model(cfg.policy, device=resolve_device(cfg.device))

    def fill(tmp: Path) -> None:
        summary.update(
            train_sl_cai(
                loaded,
                [(r["prompt"], r["final"]) for r in rows],
                tmp,
                cfg.sft_epochs,
                cfg.sft_lr,
                cfg.sft_batch_size,
                cfg.lora_r,
                cfg.lora_alpha,
                cfg.seed,
                progress=cfg.progress,
            )
        )

    summary: dict[str, Any] = {"examples": len(rows)}
    atomic_dir(out / "adapter", fill)
    return summary


def stage_feedback(cfg: CaiConfig, out: Path) -> dict[str, Any]:
    adapter = _needs(cfg, "sft") / "adapter"
    policy_chat = _chat(cfg, cfg.policy, [adapter])
    feedback_chat = _chat(cfg, cfg.feedback_model or cfg.policy)
    prompts = prompt_sets(cfg)["train"][: cfg.feedback_prompts]
    pairs = ai_feedback(
        policy_chat,
        feedback_chat,
        prompts,
        load_constitution(cfg.constitution),
        cfg.max_new_tokens,
        cfg.temperature,
        cfg.seed,
        cfg.chain_of_thought,
        cfg.generation_batch_size,
        cfg.progress,
    )
    write_jsonl(out / "pairs.jsonl", pairs)
    labels = [p["label"] for p in pairs]
    return {
        "pairs": len(pairs),
        "label_mean": sum(labels) / len(labels),
        "label_min": min(labels),
        "label_max": max(labels),
        "feedback_model": cfg.feedback_model or cfg.policy,
    }


def stage_train_pm(cfg: CaiConfig, out: Path) -> dict[str, Any]:
    from tether.train_rm import train_reward_model

    pairs = _needs(cfg, "feedback") / "pairs.jsonl"
    result = train_reward_model(
        RewardModelConfig(
            pairs=str(pairs),
            out=str(out / "model"),
            base=cfg.policy,
            epochs=cfg.pm_epochs,
            lr=cfg.pm_lr,
            lora_r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            seed=cfg.seed,
            device=cfg.device,
            progress=cfg.progress,
        )
    )
    return {
        "train_pairs": result.n_train,
        "heldout_pairs": result.n_heldout,
        "heldout_accuracy_before": result.heldout_accuracy_before,
        "heldout_accuracy": result.heldout_accuracy,
        "train_accuracy": result.train_accuracy,
        "epoch_losses": result.losses,
    }


def rl_config(cfg: CaiConfig, prompts_file: Path, run_dir: Path) -> TrainConfig:
    """PPO against the preference model, starting from (and leashed to) the SL-CAI model."""
    return TrainConfig(
        model=ModelOptions(
            policy=cfg.policy,
            adapter=str(_needs(cfg, "sft") / "adapter"),
            lora_r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            device=cfg.device,
        ),
        task=TaskOptions(
            reward=f"pm:{_needs(cfg, 'train-pm') / 'model'}",
            prompts=f"jsonl:{prompts_file}",
            judge=cfg.judge,
            heldout_fraction=cfg.heldout_fraction,
        ),
        run=RunOptions(out=str(run_dir), progress=cfg.progress),
        # the estimator and the KL leash, the pipeline's `--rl-` groups as they are
        rl=dataclasses.replace(cfg.rl),
        kl=dataclasses.replace(cfg.rl_kl),
        sampling=SamplingOptions(max_new_tokens=cfg.max_new_tokens),
        guard=GuardOptions(
            # the guard probes the held-out red-team prompts once, after the last step
            judge_every=cfg.rl.steps if cfg.judge else 0,
            probe_prompts=cfg.eval_prompts,
        ),
        # save_every 1: an adapter of a few MB, a killed `cai rl` loses at most one step
        training=TrainingOptions(seed=cfg.seed, save_every=1),
    )


def _resumable_rl(rl_cfg: TrainConfig) -> bool:
    """Whether an interrupted PPO run in `rl_cfg.run.out` can go on: it holds a complete checkpoint
    and was written with the same config (a changed config starts the stage over)."""
    run = RunDir(rl_cfg.run.out)
    try:
        run.check(config_to_yaml(rl_cfg), resume=True)
    except TetherError:
        return False
    return run.latest_checkpoint() is not None


def stage_rl(cfg: CaiConfig, out: Path) -> dict[str, Any]:
    from tether.trainer import train

    sets = prompt_sets(cfg)
    # train prompts and held-out ones: the trainer's own hash split trains on the first and
    # probes (guard) the second, the same split as the evaluation's
    prompts_file = out / "prompts.jsonl"
    write_jsonl(prompts_file, [{"prompt": p} for p in sets["train"] + sets["heldout"]])
    rl_cfg = rl_config(cfg, prompts_file, out / "run")
    rl_cfg.training.resume = _resumable_rl(rl_cfg)
    if not rl_cfg.training.resume:  # an interrupted attempt that cannot go on: start the run over
        shutil.rmtree(rl_cfg.run.out, ignore_errors=True)
    result = train(rl_cfg)
    last = result.metrics[-1]
    return {
        "steps": len(result.metrics),
        "reward_mean_first": result.metrics[0]["reward_mean"],
        "reward_mean_last": last["reward_mean"],
        "kl_mean_last": last["kl_mean"],
        "guard_flags": result.guard.get("flags", 0),
    }


def stage_eval(cfg: CaiConfig, out: Path) -> dict[str, Any]:
    sets = prompt_sets(cfg)
    sft = _needs(cfg, "sft") / "adapter"
    rl = _needs(cfg, "rl") / "run" / "final"
    pm = load_reward(f"pm:{_needs(cfg, 'train-pm') / 'model'}", cfg.device)
    judge = load_reward(cfg.judge, cfg.device) if cfg.judge else None
    answers: dict[str, dict[str, list[str]]] = {}
    for name, adapters in (("base", []), ("SL-CAI", [sft]), ("RL-CAI", [sft, rl])):
        chat = _chat(cfg, cfg.policy, adapters)
        answers[name] = {
            kind: chat.generate(
                [chat.render([{"role": "user", "content": p}]) for p in sets[kind]],
                cfg.max_new_tokens,
                cfg.temperature,
                cfg.seed + 99,  # the same stream for every model
                cfg.generation_batch_size,
                f"eval {name} {kind}",
                cfg.progress,
            )
            for kind in ("heldout", "harmless")
        }
        answers[name]["harmful"] = answers[name].pop("heldout")
        del chat
    table, rows = cai_eval.score_models(answers, sets["heldout"], sets["harmless"], pm, judge)
    report = {
        "models": table,
        "judge": cfg.judge or "none",
        "pm": pm.name,
        "n_harmful": len(sets["heldout"]),
        "n_harmless": len(sets["harmless"]),
        "stages": {s: json.loads((stage_dir(cfg, s) / DONE).read_text()) for s in STAGES[:-1]},
        "note": (
            "The gold judge measures offensive language, not dangerous help; refusals are counted "
            "by a regular expression of refusal phrases; PM scores come from the pipeline's own "
            "preference model, which RL-CAI was trained against (so it favours RL-CAI by design)."
        ),
    }
    cai_eval.write_report(out, report, rows)
    return {"table": table}


RUNNERS: dict[str, Callable[[CaiConfig, Path], dict[str, Any]]] = {
    "revise": stage_revise,
    "sft": stage_sft,
    "feedback": stage_feedback,
    "train-pm": stage_train_pm,
    "rl": stage_rl,
    "eval": stage_eval,
}


def run_stage(cfg: CaiConfig, stage: str) -> dict[str, Any]:
    """Run one stage now (finished or not), then mark it done; later stages are unmarked."""
    root = Path(cfg.out)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TetherError(f"cannot create {root}: {e.strerror}") from None
    atomic_write_text(root / "config.yaml", config_to_yaml(cfg))
    atomic_write_text(root / "prompts.json", json.dumps(prompt_sets(cfg), indent=2))
    was_done = is_done(cfg, stage)
    for later in STAGES[STAGES.index(stage) :]:
        (stage_dir(cfg, later) / DONE).unlink(missing_ok=True)
    if STAGES.index(stage) < STAGES.index("rl"):
        # PPO's checkpoints were trained on this stage's old output: never resume from them
        shutil.rmtree(stage_dir(cfg, "rl"), ignore_errors=True)
    out = stage_dir(cfg, stage)
    # from scratch: an interrupted attempt leaves half-written files (temp dirs of atomic
    # writes); except an interrupted PPO run, which stage_rl resumes when it can
    if stage != "rl" or was_done:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary = RUNNERS[stage](cfg, out)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(out / DONE, json.dumps(summary, indent=2))
    return summary


def run_pipeline(cfg: CaiConfig) -> dict[str, Any]:
    """Every stage in order, skipping finished ones; returns the evaluation report."""
    for i, stage in enumerate(STAGES, start=1):
        if is_done(cfg, stage):
            print(
                f"[{i}/{len(STAGES)}] {stage}: done already, skipped", file=sys.stderr, flush=True
            )
            continue
        print(f"[{i}/{len(STAGES)}] {stage} ...", file=sys.stderr, flush=True)
        summary = run_stage(cfg, stage)
        print(
            f"[{i}/{len(STAGES)}] {stage}: finished in {summary['seconds']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    return load_report(cfg)


def load_report(cfg: CaiConfig) -> dict[str, Any]:
    path = _needs(cfg, "eval") / cai_eval.REPORT_JSON
    return json.loads(path.read_text())
