"""One config model: option groups (model and LoRA, task, sampling, estimator, KL, guard,
evaluation, run), each a small dataclass with its own checks, composed into one config class per
command. The CLI (cli.py) and YAML files are generated from and checked against these classes, the
resolved config is saved whole in every run directory, and a command shows and accepts only the
groups it is composed of.

A command that changes a default redeclares the field with the new default and no help: the help
is the group's (`option_help`), so it is written once."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from tether.errors import TetherError

Advantage = Literal["gae", "grpo", "rloo", "reinforce++"]


def _opt(default: Any, help: str | None = None, **kw: Any) -> Any:
    """A dataclass field with its one-line help, which the CLI reuses. No help: the field
    overrides a group's default and keeps the group's help."""
    return field(default=default, metadata={"help": help, **kw})


class _Options:
    """What every option group and command config shares: checks run after construction,
    group by group (each group's `_check`, in the order the groups compose), once the required
    options are all there."""

    def __post_init__(self) -> None:
        for klass in reversed(type(self).__mro__):
            if "_resolve" in vars(klass):
                vars(klass)["_resolve"](self)
        self.validate()

    def validate(self) -> None:
        """Check values that the types cannot; messages show the offending values."""
        if any(
            getattr(self, f.name) is None
            for f in dataclasses.fields(self)
            if f.metadata.get("required")
        ):
            return  # partially built (e.g. while merging YAML and CLI); checked again when complete
        for klass in reversed(type(self).__mro__):
            if "_check" in vars(klass):
                vars(klass)["_check"](self)


def _at_least_one(cfg: Any, *names: str) -> None:
    for name in names:
        if (value := getattr(cfg, name)) is not None and value < 1:
            raise TetherError(f"{name} must be >= 1, got {value}")


# ------------------------------------------------------------------------------------------------
# option groups
# ------------------------------------------------------------------------------------------------


@dataclass
class RunOptions(_Options):
    """Options: where the run goes."""

    title: ClassVar[str] = "where the run goes"

    out: str = _opt(
        None, "run directory (metrics.jsonl, config.yaml, checkpoints/, final/)", required=True
    )
    progress: bool = _opt(True, "show a progress bar")


@dataclass
class ModelOptions(_Options):
    """Options: model and LoRA."""

    title: ClassVar[str] = "model and LoRA"

    policy: str = _opt(
        None,
        "model: local dir, Hugging Face hub id, or 'smollm2' (embedded default)",
        required=True,
    )
    adapter: str | None = _opt(
        None,
        "existing LoRA adapter dir to start from; it is merged, so the reference is the starting policy",
    )
    lora_r: int = _opt(16, "LoRA rank")
    lora_alpha: int = _opt(32, "LoRA alpha")
    lora_dropout: float = _opt(
        0.0, "LoRA dropout (applies only in the update: rollouts and log-probs run in eval mode)"
    )
    lora_target_modules: list[str] | None = _opt(
        None,
        "modules that get LoRA (default: PEFT's per-architecture choice, else all linear layers; "
        "all-linear: every linear layer but the output head)",
    )
    reference: Literal["shared", "full-copy"] = _opt(
        "shared",
        "shared: adapter disabled on the same weights; full-copy: a second frozen model (benchmarks)",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = _opt("float32", "model weight dtype")
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto")
    trust_remote_code: bool = _opt(
        False,
        "let transformers run Python code shipped with a model or reward model (auto_map); "
        "off: such a model is refused",
    )
    allow_bin_weights: bool = _opt(
        False,
        "also read pickle-based PyTorch .bin weights (with torch.load(weights_only=True)); "
        "off: safetensors only",
    )

    def load_safety(self) -> dict[str, bool]:
        """The model-loading switches, as keyword arguments of load_model / load_reward."""
        return {
            "trust_remote_code": self.trust_remote_code,
            "allow_bin_weights": self.allow_bin_weights,
        }

    def _check(self) -> None:
        _at_least_one(self, "lora_r")


@dataclass
class TaskOptions(_Options):
    """Options: reward, prompts and judge."""

    title: ClassVar[str] = "reward, prompts and judge"

    reward: str = _opt(
        None,
        "reward spec: profanity[@prob|@logit], hatesonar, hf:ID_OR_PATH[:LABEL][@prob|@logit], "
        "pm:DIR (a trained preference model), python:pkg.mod:fn or python:path/file.py:fn",
        required=True,
    )
    prompts: str = _opt(
        None,
        'prompt spec: jsonl:PATH (one {"prompt": ...} object a line), chitchat[:toxic] or '
        "dialogsum[:PATH][@MIN-MAX]",
        required=True,
    )
    judge: str | None = _opt(
        None, "independent gold judge for the guard's probes, never the reward (a reward spec)"
    )
    heldout_fraction: float = _opt(
        0.25, "share of the prompt source held out (guard probes, evaluation), never trained on"
    )

    def _check(self) -> None:
        if not 0 < self.heldout_fraction < 1:
            raise TetherError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.judge is not None and self.judge == self.reward:
            raise TetherError(
                f"--judge {self.judge} is also the --reward: the gold judge must be independent"
            )


@dataclass
class EmbeddedTask(_Options):
    """The embedded offline default, all from PyPI: SmolLM2 + alt-profanity-check (proxy) +
    HateSonar (gold) + the toxic-prone chit-chat pool. First among the groups of the commands
    that run it, so its defaults win."""

    policy: str = _opt("smollm2")
    reward: str = _opt(
        "profanity@logit",
        "proxy reward spec (profanity[@prob|@logit], hatesonar, hf:..., python:...)",
    )
    prompts: str = _opt(
        "chitchat:toxic", "prompt spec; its train split trains, its held-out split evaluates/probes"
    )
    judge: str = _opt(
        "hatesonar", "independent gold judge, never the reward (same specs as --reward)"
    )


@dataclass
class SamplingOptions(_Options):
    """Options: sampling."""

    title: ClassVar[str] = "sampling"

    max_new_tokens: int = _opt(48, "most tokens generated per completion")
    min_new_tokens: int = _opt(0, "fewest tokens generated per completion")
    temperature: float = _opt(1.0, "sampling temperature (also applied to the log-probs PPO uses)")
    top_k: int = _opt(0, "top-k sampling (0 = off)")
    top_p: float = _opt(1.0, "nucleus sampling (1.0 = off)")
    max_prompt_tokens: int = _opt(512, "longer prompts are cut from the left (counted, warned)")
    chat_template: Literal["auto", "on", "off"] = _opt(
        "auto",
        "wrap prompts in the tokenizer's chat template (auto: when it has one and the model is causal)",
    )

    def _check(self) -> None:
        _at_least_one(self, "max_new_tokens", "max_prompt_tokens")
        if self.min_new_tokens > self.max_new_tokens:
            raise TetherError(
                f"min_new_tokens {self.min_new_tokens} exceeds max_new_tokens {self.max_new_tokens}"
            )
        if self.temperature <= 0:
            raise TetherError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise TetherError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class EstimatorOptions(_Options):
    """Options: the estimator and the PPO update."""

    title: ClassVar[str] = "the estimator and the PPO update"

    advantage: Advantage = _opt(
        "gae",
        "advantage estimator: gae (PPO with a critic), grpo, rloo or reinforce++ (critic-free, "
        "no value head)",
    )
    group_size: int | None = _opt(
        None,
        "completions sampled per prompt (a step samples batch_size / group_size prompts); "
        "unset: 4 for grpo and rloo, 1 otherwise",
    )
    grpo_std: bool = _opt(
        True, "grpo: divide each group's advantages by its std (--no-grpo-std: Dr. GRPO)"
    )
    loss_aggregation: (
        Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] | None
    ) = _opt(
        None,
        "policy loss over tokens: token-mean (DAPO), seq-mean-token-mean (GRPO as published) or "
        "seq-mean-token-sum-norm (Dr. GRPO's constant); unset: token-mean (rloo: per completion)",
    )
    missing_eos_penalty: float | None = _opt(
        None, "subtract this from the score of a completion that ends without EOS (truncated)"
    )
    mask_truncated_completions: bool = _opt(
        False, "leave completions that end without EOS out of the loss"
    )
    steps: int = _opt(20, "PPO steps (each = one batch of rollouts + its update)")
    batch_size: int = _opt(16, "completions generated and scored per step")
    mini_batch_size: int = _opt(4, "completions per optimiser step")
    gradient_accumulation_steps: int | None = _opt(
        None,
        "micro-batches per mini-batch (mini_batch_size must divide by it); unset: micro-batches "
        "of 2 completions on CPU (see benchmarks/ppo_step.py --memory), one micro-batch elsewhere",
    )
    ppo_epochs: int = _opt(2, "passes over each batch of rollouts")
    forward_batch_size: int = _opt(8, "sequences per no-grad log-prob pass (memory vs speed)")
    lr: float = _opt(1e-4, "AdamW learning rate for the LoRA adapter and value head")
    lr_scheduler: Literal["constant", "linear", "cosine"] = _opt(
        "constant", "learning-rate schedule over all optimiser steps"
    )
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "clip the global gradient norm to this (0 = off)")
    cliprange: float = _opt(0.2, "PPO policy ratio clip epsilon")
    cliprange_value: float = _opt(
        0.2, "value clip: how far a value may move from its rollout estimate"
    )
    vf_coef: float = _opt(0.1, "weight of the value loss")
    gamma: float = _opt(1.0, "discount over response tokens")
    lam: float = _opt(0.95, "GAE lambda")
    whiten_advantages: bool = _opt(True, "normalise advantages over each batch")
    score_norm: bool = _opt(
        False,
        "normalise reward scores by their running mean and std over all steps so far (not per batch: "
        "a batch of near-equal scores is not blown up into a strong signal)",
    )
    early_stop_kl: float | None = _opt(
        None, "stop the epoch loop when the mean approx-KL of a mini-batch exceeds this"
    )
    max_importance_ratio: float | None = _opt(
        10.0,
        "skip a mini-batch whose mean per-token PPO ratio new/old (1 in expectation) exceeds "
        "this or falls below its inverse (counted as skipped_ratio; null in YAML: no check)",
    )
    max_consecutive_skips: int = _opt(
        8,
        "stop with an error after this many mini-batches in a row were skipped (non-finite "
        "loss/gradients or extreme ratios); the last complete checkpoint is kept",
    )

    @property
    def has_critic(self) -> bool:
        """Only gae trains a value head; the critic-free estimators build none."""
        return self.advantage == "gae"

    def _resolve(self) -> None:
        """The estimator-dependent defaults, resolved once after parsing (and saved resolved)."""
        if self.group_size is None:
            self.group_size = 4 if self.advantage in ("grpo", "rloo") else 1
        if self.loss_aggregation is None and self.advantage != "rloo":
            self.loss_aggregation = "token-mean"

    def _check(self) -> None:
        _at_least_one(
            self,
            "steps",
            "batch_size",
            "mini_batch_size",
            "gradient_accumulation_steps",  # None: the device's default
            "ppo_epochs",
            "forward_batch_size",
            "group_size",
        )
        if self.batch_size % self.mini_batch_size:
            raise TetherError(
                f"batch_size {self.batch_size} is not divisible by mini_batch_size {self.mini_batch_size}"
            )
        if (
            self.gradient_accumulation_steps
            and self.mini_batch_size % self.gradient_accumulation_steps
        ):
            raise TetherError(
                f"mini_batch_size {self.mini_batch_size} is not divisible by "
                f"gradient_accumulation_steps {self.gradient_accumulation_steps}"
            )
        if self.batch_size % self.group_size:
            raise TetherError(
                f"batch_size {self.batch_size} is not divisible by group_size {self.group_size}"
            )
        if self.advantage in ("grpo", "rloo") and self.group_size < 2:
            raise TetherError(
                f"--advantage {self.advantage} compares completions of the same prompt: "
                f"group_size must be >= 2, got {self.group_size}"
            )
        if self.advantage == "rloo" and self.loss_aggregation is not None:
            raise TetherError(
                f"--loss-aggregation {self.loss_aggregation}: rloo's loss is one clipped ratio per "
                "completion, averaged over completions; there are no tokens to aggregate"
            )
        if self.lr <= 0:
            raise TetherError(f"lr must be > 0, got {self.lr}")
        if self.max_importance_ratio is not None and self.max_importance_ratio <= 1:
            raise TetherError(f"max_importance_ratio must be > 1, got {self.max_importance_ratio}")
        if self.max_consecutive_skips < 1:
            raise TetherError(
                f"max_consecutive_skips must be >= 1, got {self.max_consecutive_skips}"
            )


@dataclass
class KLOptions(_Options):
    """Options: the KL leash to the reference."""

    title: ClassVar[str] = "the KL leash to the reference"

    kl_coef: float = _opt(0.05, "initial KL penalty coefficient beta")
    target_kl: float | None = _opt(
        None, "adaptive KL: steer mean per-sequence KL (nats) toward this; unset = fixed beta"
    )
    kl_horizon: int = _opt(10_000, "adaptive KL horizon in samples (Ziegler et al.)")
    kl_penalty: Literal["reward", "loss"] | None = _opt(
        None,
        "where the KL penalty goes: into the reward (shaped per token) or into the loss (GRPO); "
        "unset: loss for grpo, reward otherwise",
    )
    kl_estimator: Literal["k1", "k2", "k3", "full"] | None = _opt(
        None,
        "per-token KL: k1/k2/k3 from the sampled token, full = exact over the whole vocabulary "
        "(one more forward pass); unset: k3 in the loss, k1 in the reward",
    )
    kl_chunk_size: int = _opt(
        128, "full KL: positions per chunk of the vocabulary-wide softmaxes (memory vs speed)"
    )

    def _check(self) -> None:
        _at_least_one(self, "kl_chunk_size")
        if self.target_kl is not None and self.target_kl <= 0:
            raise TetherError(f"target_kl must be > 0, got {self.target_kl}")
        if self.kl_coef < 0:
            raise TetherError(f"kl_coef must be >= 0, got {self.kl_coef}")


@dataclass
class RLOptions(EstimatorOptions, KLOptions):
    """The estimator with its leash: where the KL goes depends on the estimator."""

    def _resolve(self) -> None:
        if self.kl_penalty is None:
            self.kl_penalty = "loss" if self.advantage == "grpo" else "reward"
        if self.kl_estimator is None:
            self.kl_estimator = "k3" if self.kl_penalty == "loss" else "k1"

    def _check(self) -> None:
        """The estimator's combinations with the KL that do not make sense, one line each."""
        if self.kl_penalty == "loss" and self.kl_estimator == "k1":
            raise TetherError(
                "--kl-estimator k1 in the loss has zero expected gradient (E[grad log pi] = 0 on "
                "policy samples): use k2, k3 or full with --kl-penalty loss"
            )
        if self.kl_penalty == "loss" and self.advantage == "reinforce++":
            raise TetherError(
                "--advantage reinforce++ puts the KL penalty in the token rewards by definition "
                "(Hu 2025); drop --kl-penalty loss"
            )
        if self.kl_penalty == "loss" and self.advantage == "rloo":
            raise TetherError(
                "--advantage rloo treats a completion as one action and puts its KL in the reward "
                "(Ahmadian et al. 2024); drop --kl-penalty loss"
            )


@dataclass
class GuardOptions(_Options):
    """Options: the reward-hacking guard (see guard.py)."""

    title: ClassVar[str] = "the reward-hacking guard (see guard.py)"

    judge_every: int = _opt(
        10, "probe held-out prompts every N steps: proxy vs gold, phrases, fluency (0 = off)"
    )
    probe_prompts: int = _opt(32, "held-out prompts in the guard's fixed probe set")
    kl_budget: float | None = _opt(None, "flag KL to the reference above this (nats/sequence)")
    on_hack: Literal["warn", "stop", "rollback"] = _opt(
        "warn", "when the guard flags hacking: warn, stop the run, or roll back to best/ and stop"
    )

    def _check(self) -> None:
        if self.judge_every < 0 or self.probe_prompts < 1:
            raise TetherError(
                f"judge_every must be >= 0 and probe_prompts >= 1, got {self.judge_every}, "
                f"{self.probe_prompts}"
            )
        if self.kl_budget is not None and self.kl_budget <= 0:
            raise TetherError(f"kl_budget must be > 0, got {self.kl_budget}")


@dataclass
class TrainingRunOptions(_Options):
    """Options: seeds, checkpoints and tracking."""

    title: ClassVar[str] = "seeds, checkpoints and tracking"

    seed: int = _opt(0, "seed for data order, sampling and initialisation")
    save_every: int = _opt(10, "write checkpoints/step-N every N steps (0 = only final/)")
    resume: bool = _opt(False, "continue from the last complete checkpoint in --out")
    force: bool = _opt(
        False, "with --resume: continue even though --out was written with a different config"
    )
    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] = _opt(
        "none",
        "also send the metrics to this tracker through Accelerate (metrics.jsonl is always written; "
        "tensorboard: RUN/tensorboard/)",
    )


@dataclass
class EvalOptions(_Options):
    """Options: evaluation on held-out prompts."""

    title: ClassVar[str] = "evaluation on held-out prompts"

    eval_prompts: int = _opt(
        200, "held-out prompts evaluated before and after (fewer only if the split has fewer)"
    )
    eval_batch_size: int = _opt(16, "prompts per generation batch in evaluation")
    eval_seed: int = _opt(1234, "seed of the evaluation sampling (the same before and after)")
    similarity: bool = _opt(
        True, "measure completion-prompt embedding similarity (all-MiniLM-L6-v2)"
    )

    def _check(self) -> None:
        if self.eval_prompts < 1 or self.eval_batch_size < 1:
            raise TetherError(
                f"eval_prompts and eval_batch_size must be >= 1, got {self.eval_prompts}, {self.eval_batch_size}"
            )


# ------------------------------------------------------------------------------------------------
# one config per command: its groups, first group's defaults win (EmbeddedTask before the rest)
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig(
    ModelOptions,
    TaskOptions,
    RunOptions,
    RLOptions,
    SamplingOptions,
    GuardOptions,
    TrainingRunOptions,
):
    """`tether train`: PPO against a reward, with a LoRA policy and a KL leash to the starting
    policy."""


@dataclass
class EmbeddedDefaultConfig(EmbeddedTask, TrainConfig):
    """`tether train`'s options with the embedded offline default as model, reward, prompts and
    judge. Base of the commands that train on it."""


@dataclass
class DetoxConfig(EmbeddedDefaultConfig, EvalOptions):
    """`tether detox`: baseline eval, PPO against a toxicity reward, aligned eval, report.
    Defaults are the embedded offline recipe, sized for 2 CPU cores."""

    judge_every: int = _opt(9)
    # the recipe sized for 2 CPU cores: README, "What the default run shows", has its wall time
    steps: int = _opt(18)
    ppo_epochs: int = _opt(1)
    lr: float = _opt(6e-4)
    kl_coef: float = _opt(0.05)
    score_norm: bool = _opt(True)
    whiten_advantages: bool = _opt(False)


@dataclass
class EvalConfig(EmbeddedTask, ModelOptions, TaskOptions, RunOptions, SamplingOptions, EvalOptions):
    """`tether eval`: the starting policy, and optionally a trained adapter, on the held-out
    prompts with the same decoding and seeds as detox."""

    title: ClassVar[str] = "what to evaluate"

    trained: str | None = _opt(
        None, "a trained adapter dir (e.g. RUN/final) to compare with the starting policy"
    )


@dataclass
class HackingDemoConfig(EmbeddedDefaultConfig):
    """`tether hacking-demo`: the same short PPO job twice on the embedded default, once without
    the KL leash (kl_coef 0, a higher learning rate) and once with it (adaptive KL); the guard
    watches both. The options below configure the leashed arm; the unleashed one differs only in
    kl_coef = 0 and lr = unleashed_lr."""

    title: ClassVar[str] = "the unleashed arm"

    steps: int = _opt(10, "PPO steps per arm")
    ppo_epochs: int = _opt(1)
    lr: float = _opt(6e-4, "learning rate of the leashed arm")
    unleashed_lr: float = _opt(2e-3, "learning rate of the arm without the KL penalty")
    kl_coef: float = _opt(0.1, "initial KL coefficient of the leashed arm")
    target_kl: float | None = _opt(
        1.0, "the leashed arm's adaptive controller steers KL toward this (nats/sequence)"
    )
    whiten_advantages: bool = _opt(True)
    score_norm: bool = _opt(True)
    judge_every: int = _opt(5, "probe held-out prompts every N steps (and after the last)")
    save_every: int = _opt(0)

    def _check(self) -> None:
        if self.judge is None or self.judge_every < 1:
            raise TetherError(
                "hacking-demo needs a --judge and --judge-every >= 1: gold is the point"
            )
        if self.unleashed_lr <= 0:
            raise TetherError(f"unleashed_lr must be > 0, got {self.unleashed_lr}")


@dataclass
class RewardModelConfig(_Options):
    """`tether train-rm`: a Bradley-Terry preference model (LoRA + score head) from pairs."""

    title: ClassVar[str] = "the preference model"

    pairs: str = _opt(
        None,
        'JSONL file, one {"prompt", "chosen", "rejected"} object a line, optionally a soft '
        '"label" in [0, 1] (probability that chosen is better; default 1)',
        required=True,
    )
    out: str = _opt(
        None, "directory for the preference model (usable as reward pm:DIR)", required=True
    )
    base: str = _opt(
        "smollm2", "base model: local dir, Hugging Face hub id, or 'smollm2' (embedded default)"
    )
    epochs: int = _opt(2, "passes over the training pairs")
    batch_size: int = _opt(4, "pairs per optimiser step")
    lr: float = _opt(5e-4, "AdamW learning rate (LoRA and score head)")
    lora_r: int = _opt(8, "LoRA rank")
    lora_alpha: int = _opt(16, "LoRA alpha")
    max_length: int = _opt(256, "tokens of prompt + answer scored (longer ones lose their start)")
    heldout_fraction: float = _opt(
        0.2, "share of pairs held out (by a hash of the text) to measure pairwise accuracy"
    )
    seed: int = _opt(0, "seed of initialisation and data order")
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto")
    progress: bool = _opt(True, "show a progress bar")

    def validate(self) -> None:  # every option has a value: no partial state to wait for
        _at_least_one(self, "epochs", "batch_size", "lora_r", "max_length")
        if self.lr <= 0:
            raise TetherError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.heldout_fraction < 1:
            raise TetherError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")


@dataclass
class CaiRLOptions(RLOptions):
    """RL-CAI (stage 5): PPO against the preference model, leashed to the SL-CAI model. The same
    estimator and KL options as `tether train`, sized for the pipeline."""

    title: ClassVar[str] = "RL-CAI (stage 5): the estimator and the KL leash, as in `tether train`"

    steps: int = _opt(5)
    batch_size: int = _opt(4)
    mini_batch_size: int | None = _opt(
        None, "completions per optimiser step (unset: 4 when it divides batch_size, else all)"
    )
    ppo_epochs: int = _opt(1)
    lr: float = _opt(2e-4)
    kl_coef: float = _opt(0.1, "KL penalty coefficient to the SL-CAI model")
    score_norm: bool = _opt(True, "normalise the preference model's scores (logits on no scale)")

    def _resolve(self) -> None:
        if self.mini_batch_size is None:
            self.mini_batch_size = 4 if self.batch_size % 4 == 0 else self.batch_size


@dataclass
class CaiConfig(_Options):
    """`tether cai ...`: the Constitutional AI pipeline in one directory, one subdirectory per
    stage. Defaults are sized for the embedded SmolLM2 on 2 CPU cores (`cai run` <= 30 min)."""

    title: ClassVar[str] = "the pipeline"

    out: str = _opt(None, "pipeline directory (one subdirectory per stage)", required=True)
    policy: str = _opt(
        "smollm2", "base model: local dir, Hugging Face hub id, or 'smollm2' (embedded default)"
    )
    feedback_model: str | None = _opt(
        None, "model that answers the AI-feedback questions (default: the base model)"
    )
    constitution: str | None = _opt(
        None, "YAML file of principles (default: tether's own, cai/constitution.yaml)"
    )
    redteam: str = _opt(
        "default",
        "red-team prompts: default (tether's own + jailbreak-corpus-mini) or jsonl:PATH",
    )
    heldout_fraction: float = _opt(
        0.25, "share of red-team prompts held out for evaluation (by a hash of the text)"
    )
    train_prompts: int = _opt(24, "red-team training prompts used by the stages")
    revision_rounds: int = _opt(1, "critique-revision rounds per answer (K)")
    max_new_tokens: int = _opt(48, "most tokens per generated answer, critique or revision")
    temperature: float = _opt(0.7, "sampling temperature of answers, critiques and revisions")
    generation_batch_size: int = _opt(8, "conversations per generation batch")
    lora_r: int = _opt(8, "LoRA rank (SL-CAI, preference model, RL)")
    lora_alpha: int = _opt(16, "LoRA alpha")
    sft_epochs: int = _opt(1, "SL-CAI: passes over (prompt, final revision)")
    sft_lr: float = _opt(5e-4, "SL-CAI learning rate")
    sft_batch_size: int = _opt(4, "SL-CAI examples per optimiser step")
    feedback_prompts: int = _opt(24, "AI feedback: prompts, two sampled answers each")
    chain_of_thought: bool = _opt(
        False, "AI feedback: reason first, then answer; labels clamped to [0.4, 0.6]"
    )
    pm_epochs: int = _opt(2, "preference model: passes over the AI-labelled pairs")
    pm_lr: float = _opt(5e-4, "preference model learning rate")
    rl: CaiRLOptions = field(default_factory=CaiRLOptions, metadata={"nested": True})
    judge: str | None = _opt(
        "hatesonar",
        "gold judge of harmfulness for the guard and the evaluation (a reward spec; none: off)",
    )
    eval_prompts: int = _opt(8, "held-out red-team prompts in the evaluation")
    eval_harmless: int = _opt(8, "harmless prompts in the helpfulness evaluation")
    seed: int = _opt(0, "seed of sampling, initialisation and data order")
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto")
    progress: bool = _opt(True, "show progress bars")

    def _resolve(self) -> None:
        if self.judge in ("", "none"):
            self.judge = None
        if isinstance(self.rl, dict):  # dataclasses.replace / a nested YAML mapping
            self.rl = CaiRLOptions(**self.rl)

    def _check(self) -> None:
        _at_least_one(
            self,
            "train_prompts",
            "revision_rounds",
            "max_new_tokens",
            "generation_batch_size",
            "lora_r",
            "sft_epochs",
            "sft_batch_size",
            "feedback_prompts",
            "pm_epochs",
            "eval_prompts",
            "eval_harmless",
        )
        if not 0 < self.heldout_fraction < 1:
            raise TetherError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.temperature <= 0:
            raise TetherError(f"temperature must be > 0, got {self.temperature}")


# The commands and their configs: the CLI builds one parser per entry, and an option refused
# by one command is named with the commands that take it.
COMMANDS: dict[str, type] = {
    "train": TrainConfig,
    "detox": DetoxConfig,
    "eval": EvalConfig,
    "hacking-demo": HackingDemoConfig,
    "train-rm": RewardModelConfig,
    "cai": CaiConfig,
}


# ------------------------------------------------------------------------------------------------
# options: names, groups, help, types
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One command-line option / YAML key of a command: `name` as in YAML (`rl_steps` for a
    nested field), `path` to its value in the config (`("rl", "steps")`)."""

    name: str
    path: tuple[str, ...]
    owner: type  # the dataclass that holds the field
    spec: dataclasses.Field
    group: str  # the option group's title, for --help

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _declaring_group(cls: type, name: str) -> type:
    """The option group that declares `name` first: the one furthest down the MRO with it in its
    own annotations (a command that only changes the default is not its group)."""
    for klass in reversed(cls.__mro__):
        if name in vars(klass).get("__annotations__", {}):
            return klass
    raise LookupError(f"{cls.__name__}.{name}")


@functools.cache
def options(cls: type) -> tuple[Option, ...]:
    """Every option of a command config, in --help and config.yaml order: group by group in the
    order the groups compose, then the command's own options; a nested group (cai's `rl`)
    flattened with its prefix."""
    order = {klass: i for i, klass in enumerate(cls.__mro__)}
    order[cls] = len(order)  # a command's own options come after its groups
    keyed = []
    for i, f in enumerate(dataclasses.fields(cls)):
        if f.metadata.get("nested"):
            sub = f.default_factory
            for o in options(sub):
                nested = Option(f"{f.name}_{o.name}", (f.name, *o.path), o.owner, o.spec, sub.title)
                keyed.append(((order[cls], i), nested))
            continue
        group = _declaring_group(cls, f.name)
        title = vars(group).get("title") or getattr(cls, "title", "options")
        keyed.append(((order[group], i), Option(f.name, (f.name,), cls, f, title)))
    return tuple(o for _, o in sorted(keyed, key=lambda k: k[0]))


def option_help(owner: type, name: str) -> str:
    """A field's help: its own, else the help of the group field it overrides."""
    for klass in owner.__mro__:
        if dataclasses.is_dataclass(klass):
            for f in dataclasses.fields(klass):
                if f.name == name and f.metadata.get("help"):
                    return f.metadata["help"]
    raise LookupError(f"{owner.__name__}.{name} has no help")


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config class (evaluating them is the slow part of building
    the parser: once per class, not once per field)."""
    return typing.get_type_hints(cls)


def field_type(cls: type, f: dataclasses.Field) -> tuple[type, bool, tuple | None, bool]:
    """(scalar type, optional?, literal choices or None, is_list) of a config field."""
    hint = _type_hints(cls)[f.name]
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    is_list = typing.get_origin(hint) is list
    if is_list:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), optional, choices, is_list
    return hint, optional, None, is_list


def commands_taking(name: str) -> list[str]:
    """The commands that have an option `name` (YAML spelling)."""
    return [cmd for cmd, cls in COMMANDS.items() if name in {o.name for o in options(cls)}]


def closest_key(key: str, known: list[str]) -> str:
    """' (did you mean X?)' for the nearest known key, or '' when nothing is close."""
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f" (did you mean {match[0]}?)" if match else ""


def _coerce(opt: Option, value: Any, where: str) -> Any:
    """Check and convert one YAML value to the field's type; errors name the key and the file."""
    name = opt.name
    typ, optional, choices, is_list = field_type(opt.owner, opt.spec)
    if value is None:
        if optional or opt.spec.metadata.get("required"):
            return None
        raise TetherError(f"{where}: {name} may not be empty")
    if is_list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise TetherError(f"{where}: {name} must be a list, got {value!r}")
        return [str(v) for v in value]
    try:
        if typ is bool:
            if not isinstance(value, bool):
                raise ValueError
        elif typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)
        elif typ is float:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        else:
            value = str(value)
    except (TypeError, ValueError):
        raise TetherError(f"{where}: {name} must be {typ.__name__}, got {value!r}") from None
    if choices and value not in choices:
        raise TetherError(
            f"{where}: {name} must be one of {', '.join(map(str, choices))}; got {value!r}"
        )
    return value


def _flatten(raw: dict) -> dict[str, Any]:
    """A YAML mapping with nested groups (`rl: {steps: 5}`) as flat keys (`rl_steps`)."""
    flat = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if isinstance(value, dict):
            flat.update({f"{name}_{k}": v for k, v in _flatten(value).items()})
        else:
            flat[name] = value
    return flat


def load_yaml_config(path: str, cls: type = TrainConfig) -> dict[str, Any]:
    """Read a YAML config file into checked option values, by option name. Keys may use '-' or
    '_'; a nested group may be a mapping (`rl: {steps: 5}`) or prefixed keys (`rl_steps: 5`).
    A key that another command takes is skipped (one recipe serves detox and eval), one that
    no command takes is refused with the closest match."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TetherError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TetherError(f"cannot read config file {path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise TetherError(f"{path}:{line} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise TetherError(f"{path}: expected a mapping of option: value, got {type(raw).__name__}")
    known = {o.name: o for o in options(cls)}
    values, skipped = {}, []
    for name, value in _flatten(raw).items():
        if name in known:
            values[name] = _coerce(known[name], value, path)
        elif commands_taking(name):
            skipped.append(name)
        else:
            raise TetherError(f"{path}: unknown option {name!r}{closest_key(name, list(known))}")
    if skipped:
        print(
            f"note: {path}: {len(skipped)} option(s) of other tether commands skipped: "
            + ", ".join(skipped),
            file=sys.stderr,
        )
    return values


def build_config(cls: type, yaml_path: str | None, overrides: dict[str, Any]) -> Any:
    """YAML values, then command-line overrides (the command line wins); then validation.
    Values are keyed by option name (`rl_steps` for the nested `rl.steps`)."""
    values = load_yaml_config(yaml_path, cls) if yaml_path else {}
    values.update(overrides)
    missing = [
        o.flag
        for o in options(cls)
        if o.spec.metadata.get("required") and values.get(o.name) is None
    ]
    if missing:
        raise TetherError("missing required option(s): " + ", ".join(missing))
    kwargs: dict[str, Any] = {}
    for opt in options(cls):
        if opt.name in values:
            *parents, leaf = opt.path
            target = kwargs
            for parent in parents:
                target = target.setdefault(parent, {})
            target[leaf] = values[opt.name]
    return cls(**kwargs)


def config_dict(cfg: Any) -> dict[str, Any]:
    """The whole resolved config as a mapping in option order, nested groups as mappings."""
    out: dict[str, Any] = {}
    for opt in options(type(cfg)):
        *parents, leaf = opt.path
        value, target = cfg, out
        for parent in parents:
            value, target = getattr(value, parent), target.setdefault(parent, {})
        value = getattr(value, leaf)
        target[leaf] = list(value) if isinstance(value, list) else value
    return out


def config_to_yaml(cfg: Any) -> str:
    """The whole resolved config as YAML (what `--config` reads back)."""
    return yaml.safe_dump(config_dict(cfg), sort_keys=False)
