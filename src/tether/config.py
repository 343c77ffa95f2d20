"""The options of every command, one dataclass per command.

A command config (`TrainConfig`, `DetoxConfig`, ...) is a list of fields: option groups (plain
dataclasses from tether.option_groups, read as `cfg.rl.lr`) and options of its own. A command
that changes a group's defaults, or what an option means for it, says so in its own field
(`group(RLOptions, steps=18, ...)`). Its `__post_init__` resolves the derived defaults once
(saved resolved in config.yaml), then runs the groups' checks in order. The flat option names
(`--lr`, `lr:` in YAML and config.yaml) and their parsing live in tether.options, the CLI in
tether.cli.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Self

from tether import options
from tether.errors import TetherError
from tether.option_groups import (
    EvalOptions,
    GuardOptions,
    KLOptions,
    ModelOptions,
    RLOptions,
    RunOptions,
    SamplingOptions,
    TaskOptions,
    TrainingOptions,
    at_least_one,
    check_eval,
    check_guard,
    check_kl,
    check_model,
    check_rl,
    check_rl_kl,
    check_rl_sampling,
    check_sampling,
    check_task,
    resolve_rl,
)
from tether.options import group, opt

# ------------------------------------------------------------------------------------------------
# one config per command
# ------------------------------------------------------------------------------------------------


class _Command:
    """What every command config offers besides its fields: building it from flat option names
    (`TrainConfig.from_flat(policy=..., lr=1e-3)`, as on the command line) and back."""

    @classmethod
    def from_flat(cls, **values: Any) -> Self:
        """The config from option values by flat name; unset options take the command's
        defaults; resolved and checked."""
        return options.from_flat(cls, values)

    def flat(self) -> dict[str, Any]:
        """Every option value by flat name (`{"lr": 1e-4, ...}`), in option order."""
        return options.flat_values(self)

    def replace(self, **values: Any) -> Self:
        """A copy with some options changed (flat names), checked again; the derived options
        keep their resolved values unless given (as dataclasses.replace of the old flat
        config did)."""
        return self.from_flat(**{**self.flat(), **values})


def check_training_run(cfg: TrainConfig | DetoxConfig | HackingDemoConfig) -> None:
    """The groups of a command that trains: the estimator's defaults resolved, then each group
    checked (in this order: the first error wins)."""
    resolve_rl(cfg.rl, cfg.kl)
    check_guard(cfg.guard)
    check_sampling(cfg.sampling)
    check_kl(cfg.kl)
    check_rl(cfg.rl)
    check_rl_kl(cfg.rl, cfg.kl)
    check_rl_sampling(cfg.rl, cfg.sampling.max_new_tokens)
    check_task(cfg.task)
    check_model(cfg.model)


# the embedded offline default, all from PyPI: SmolLM2 + alt-profanity-check (proxy) + HateSonar
# (gold) + the toxic-prone chit-chat pool; the commands that run it say so in their fields
EMBEDDED_TASK_HELP = {
    "reward": "proxy reward spec (profanity[@prob|@logit], hatesonar, hf:..., python:...)",
    "prompts": "prompt spec; its train split trains, its held-out split evaluates/probes",
    "judge": "independent gold judge, never the reward (same specs as --reward)",
}


def embedded_task() -> Any:
    """The task group of a command that runs the embedded default: the proxy reward, the
    prompt pool and the gold judge (which such a command always has)."""
    return group(
        TaskOptions,
        reward="profanity@logit",
        prompts="chitchat:toxic",
        judge="hatesonar",
        help=EMBEDDED_TASK_HELP,
        never_none=("judge",),
    )


@dataclass
class TrainConfig(_Command):
    """`tether train`: PPO against a reward, with a LoRA policy and a KL leash to the starting
    policy."""

    model: ModelOptions = group(ModelOptions)
    task: TaskOptions = group(TaskOptions)
    run: RunOptions = group(RunOptions)
    rl: RLOptions = group(RLOptions)
    kl: KLOptions = group(KLOptions)
    sampling: SamplingOptions = group(SamplingOptions)
    guard: GuardOptions = group(GuardOptions)
    training: TrainingOptions = group(TrainingOptions)

    def __post_init__(self) -> None:
        check_training_run(self)


@dataclass
class DetoxConfig(_Command):
    """`tether detox`: baseline eval, PPO against a toxicity reward, aligned eval, report.
    Defaults are the embedded offline recipe, sized for 2 CPU cores (README, "What the default
    run shows", has its wall time)."""

    model: ModelOptions = group(ModelOptions, policy="smollm2")
    task: TaskOptions = embedded_task()
    run: RunOptions = group(RunOptions)
    rl: RLOptions = group(
        RLOptions,
        steps=18,
        ppo_epochs=1,
        lr=6e-4,
        score_norm=True,
        whiten_advantages=False,
    )
    kl: KLOptions = group(KLOptions, kl_coef=0.05)
    sampling: SamplingOptions = group(SamplingOptions)
    guard: GuardOptions = group(GuardOptions, judge_every=9)
    training: TrainingOptions = group(TrainingOptions)
    eval: EvalOptions = group(EvalOptions)

    def __post_init__(self) -> None:
        check_eval(self.eval)
        check_training_run(self)


@dataclass
class EvalConfig(_Command):
    """`tether eval`: the starting policy, and optionally a trained adapter, on the held-out
    prompts with the same decoding and seeds as detox."""

    title: ClassVar[str] = "what to evaluate"

    model: ModelOptions = group(ModelOptions, policy="smollm2")
    task: TaskOptions = embedded_task()
    run: RunOptions = group(RunOptions)
    sampling: SamplingOptions = group(SamplingOptions)
    eval: EvalOptions = group(EvalOptions)
    trained: str | None = opt(
        None, "a trained adapter dir (e.g. RUN/final) to compare with the starting policy"
    )

    def __post_init__(self) -> None:
        check_eval(self.eval)
        check_sampling(self.sampling)
        check_task(self.task)
        check_model(self.model)


@dataclass
class HackingDemoConfig(_Command):
    """`tether hacking-demo`: the same short PPO job twice on the embedded default, once without
    the KL leash (kl_coef 0, a higher learning rate) and once with it (adaptive KL); the guard
    watches both. The options below configure the leashed arm; the unleashed one differs only in
    kl_coef = 0 and lr = unleashed_lr."""

    title: ClassVar[str] = "the unleashed arm"

    model: ModelOptions = group(ModelOptions, policy="smollm2")
    task: TaskOptions = embedded_task()
    run: RunOptions = group(RunOptions)
    rl: RLOptions = group(
        RLOptions,
        steps=10,
        ppo_epochs=1,
        lr=6e-4,
        whiten_advantages=True,
        score_norm=True,
        help={"steps": "PPO steps per arm", "lr": "learning rate of the leashed arm"},
    )
    kl: KLOptions = group(
        KLOptions,
        kl_coef=0.1,
        target_kl=1.0,
        help={
            "kl_coef": "initial KL coefficient of the leashed arm",
            "target_kl": "the leashed arm's adaptive controller steers KL toward this "
            "(nats/sequence)",
        },
    )
    sampling: SamplingOptions = group(SamplingOptions)
    guard: GuardOptions = group(
        GuardOptions,
        judge_every=2,
        help={
            "judge_every": "probe held-out prompts every N steps (and after the last): 2 gives "
            "each arm five points past the start, enough to fit the over-optimisation curve"
        },
    )
    training: TrainingOptions = group(TrainingOptions, save_every=0)
    unleashed_lr: float = opt(2e-3, "learning rate of the arm without the KL penalty")

    def __post_init__(self) -> None:
        check_training_run(self)
        if self.task.judge is None or self.guard.judge_every < 1:
            raise TetherError(
                "hacking-demo needs a --judge and --judge-every >= 1: gold is the point"
            )
        if self.unleashed_lr <= 0:
            raise TetherError(f"unleashed_lr must be > 0, got {self.unleashed_lr}")


@dataclass
class RewardModelConfig(_Command):
    """`tether train-rm`: a Bradley-Terry preference model (LoRA + score head) from pairs. Its
    options are its own: no group of the RL commands fits."""

    title: ClassVar[str] = "the preference model"

    pairs: str = opt(
        None,
        'JSONL file, one {"prompt", "chosen", "rejected"} object a line, optionally a soft '
        '"label" in [0, 1] (probability that chosen is better; default 1)',
        required=True,
    )
    out: str = opt(
        None, "directory for the preference model (usable as reward pm:DIR)", required=True
    )
    base: str = opt(
        "smollm2", "base model: local dir, Hugging Face hub id, or 'smollm2' (embedded default)"
    )
    epochs: int = opt(2, "passes over the training pairs")
    batch_size: int = opt(4, "pairs per optimiser step")
    lr: float = opt(5e-4, "AdamW learning rate (LoRA and score head)")
    lora_r: int = opt(8, "LoRA rank")
    lora_alpha: int = opt(16, "LoRA alpha")
    max_length: int = opt(256, "tokens of prompt + answer scored (longer ones lose their start)")
    heldout_fraction: float = opt(
        0.2,
        "share of pairs held out (by a hash of the prompt, so all of its pairs fall on one side) to measure pairwise accuracy",
    )
    seed: int = opt(0, "seed of initialisation and data order")
    device: str = opt("auto", "cpu, cuda, cuda:N or auto")
    progress: bool = opt(True, "show a progress bar")

    def __post_init__(self) -> None:
        at_least_one(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lora_r=self.lora_r,
            max_length=self.max_length,
        )
        if self.lr <= 0:
            raise TetherError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.heldout_fraction < 1:
            raise TetherError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")


RL_CAI = "RL-CAI (stage 5): the estimator and the KL leash, as in `tether train`"


@dataclass
class CaiConfig(_Command):
    """`tether cai ...`: the Constitutional AI pipeline in one directory, one subdirectory per
    stage. Defaults are sized for the embedded SmolLM2 on 2 CPU cores (`cai run` <= 30 min).
    The RL stage (5) takes the estimator and KL groups of `tether train` as `--rl-...` options,
    sized for the pipeline, and passes them whole to its TrainConfig."""

    title: ClassVar[str] = "the pipeline"

    out: str = opt(None, "pipeline directory (one subdirectory per stage)", required=True)
    policy: str = opt(
        "smollm2", "base model: local dir, Hugging Face hub id, or 'smollm2' (embedded default)"
    )
    feedback_model: str | None = opt(
        None, "model that answers the AI-feedback questions (default: the base model)"
    )
    constitution: str | None = opt(
        None, "YAML file of principles (default: tether's own, cai/constitution.yaml)"
    )
    redteam: str = opt(
        "default",
        "red-team prompts: default (tether's own + jailbreak-corpus-mini) or jsonl:PATH",
    )
    heldout_fraction: float = opt(
        0.25, "share of red-team prompts held out for evaluation (by a hash of the text)"
    )
    train_prompts: int = opt(24, "red-team training prompts used by the stages")
    revision_rounds: int = opt(1, "critique-revision rounds per answer (K)")
    max_new_tokens: int = opt(48, "most tokens per generated answer, critique or revision")
    temperature: float = opt(0.7, "sampling temperature of answers, critiques and revisions")
    generation_batch_size: int = opt(8, "conversations per generation batch")
    lora_r: int = opt(8, "LoRA rank (SL-CAI, preference model, RL)")
    lora_alpha: int = opt(16, "LoRA alpha")
    sft_epochs: int = opt(1, "SL-CAI: passes over (prompt, final revision)")
    sft_lr: float = opt(5e-4, "SL-CAI learning rate")
    sft_batch_size: int = opt(4, "SL-CAI examples per optimiser step")
    feedback_prompts: int = opt(24, "AI feedback: prompts, two sampled answers each")
    chain_of_thought: bool = opt(
        False, "AI feedback: reason first, then answer; labels clamped to [0.4, 0.6]"
    )
    pm_epochs: int = opt(2, "preference model: passes over the AI-labelled pairs")
    pm_lr: float = opt(5e-4, "preference model learning rate")
    rl: RLOptions = group(
        RLOptions,
        prefix="rl_",
        title=RL_CAI,
        steps=5,
        batch_size=4,
        mini_batch_size=None,  # resolved below: 4 when it divides batch_size, else batch_size
        ppo_epochs=1,
        lr=2e-4,
        score_norm=True,
        help={
            "mini_batch_size": "completions per optimiser step (unset: 4 when it divides "
            "batch_size, else all)",
            "score_norm": "normalise the preference model's scores (logits on no scale)",
        },
    )
    rl_kl: KLOptions = group(
        KLOptions,
        prefix="rl_",
        title=RL_CAI,
        kl_coef=0.1,
        help={"kl_coef": "KL penalty coefficient to the SL-CAI model"},
    )
    judge: str | None = opt(
        "hatesonar",
        "gold judge of harmfulness for the guard and the evaluation (a reward spec; none: off)",
    )
    eval_prompts: int = opt(8, "held-out red-team prompts in the evaluation")
    eval_harmless: int = opt(8, "harmless prompts in the helpfulness evaluation")
    seed: int = opt(0, "seed of sampling, initialisation and data order")
    device: str = opt("auto", "cpu, cuda, cuda:N or auto")
    progress: bool = opt(True, "show progress bars")

    def __post_init__(self) -> None:
        if self.judge in ("", "none"):
            self.judge = None
        if self.rl.mini_batch_size is None:
            self.rl.mini_batch_size = 4 if self.rl.batch_size % 4 == 0 else self.rl.batch_size
        resolve_rl(self.rl, self.rl_kl)
        check_kl(self.rl_kl)
        check_rl(self.rl)
        check_rl_kl(self.rl, self.rl_kl)
        check_rl_sampling(self.rl, self.max_new_tokens)
        at_least_one(
            train_prompts=self.train_prompts,
            revision_rounds=self.revision_rounds,
            max_new_tokens=self.max_new_tokens,
            generation_batch_size=self.generation_batch_size,
            lora_r=self.lora_r,
            sft_epochs=self.sft_epochs,
            sft_batch_size=self.sft_batch_size,
            feedback_prompts=self.feedback_prompts,
            pm_epochs=self.pm_epochs,
            eval_prompts=self.eval_prompts,
            eval_harmless=self.eval_harmless,
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


def load_yaml_config(path: str, cls: type = TrainConfig) -> dict[str, Any]:
    """A YAML config file's checked option values by flat name; keys of other commands are
    skipped (see tether.options.load_yaml_config)."""
    return options.load_yaml_config(path, cls, COMMANDS)


def build_config(cls: type, yaml_path: str | None, overrides: dict[str, Any]) -> Any:
    """YAML values, then command-line overrides (the command line wins); then the command's
    resolution and checks. Values are keyed by flat name (`rl_steps` for cai's `rl.steps`)."""
    return options.build_config(cls, yaml_path, overrides, COMMANDS)
