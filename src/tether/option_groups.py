"""The option groups that command configs (tether.config) are made of: plain dataclasses, one
line of help per field, each followed by its check, a plain function whose errors show the values.
`resolve_rl` fills the defaults that depend on the estimator, once, before the checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from tether.errors import TetherError
from tether.options import opt

Advantage = Literal["gae", "grpo", "rloo", "reinforce++"]
PolicyLoss = Literal["clip", "gspo", "cispo", "sapo"]


def at_least_one(**values: int | None) -> None:
    """Each value that is set is >= 1; the error names the first that is not."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise TetherError(f"{name} must be >= 1, got {value}")


@dataclass
class RunOptions:
    """Where the run goes."""

    title: ClassVar[str] = "where the run goes"

    out: str = opt(
        None, "run directory (metrics.jsonl, config.yaml, checkpoints/, final/)", required=True
    )
    progress: bool = opt(True, "show a progress bar")


@dataclass
class ModelOptions:
    """Model and LoRA."""

    title: ClassVar[str] = "model and LoRA"

    policy: str = opt(
        None,
        "model: local dir, Hugging Face hub id, or 'smollm2' (embedded default)",
        required=True,
    )
    adapter: str | None = opt(
        None,
        "existing LoRA adapter dir to start from; it is merged, so the reference is the starting policy",
    )
    lora_r: int = opt(16, "LoRA rank")
    lora_alpha: int = opt(32, "LoRA alpha")
    lora_dropout: float = opt(
        0.0, "LoRA dropout (applies only in the update: rollouts and log-probs run in eval mode)"
    )
    lora_target_modules: list[str] | None = opt(
        None,
        "modules that get LoRA (default: PEFT's per-architecture choice, else all linear layers; "
        "all-linear: every linear layer but the output head)",
    )
    reference: Literal["shared", "full-copy"] = opt(
        "shared",
        "shared: adapter disabled on the same weights; full-copy: a second frozen model (benchmarks)",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "model weight dtype")
    device: str = opt("auto", "cpu, cuda, cuda:N or auto")
    trust_remote_code: bool = opt(
        False,
        "let transformers run Python code shipped with a model or reward model (auto_map); "
        "off: such a model is refused",
    )
    allow_bin_weights: bool = opt(
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


def check_model(model: ModelOptions) -> None:
    at_least_one(lora_r=model.lora_r)


@dataclass
class TaskOptions:
    """Reward, prompts and judge."""

    title: ClassVar[str] = "reward, prompts and judge"

    reward: str = opt(
        None,
        "reward spec: profanity[@prob|@logit], hatesonar, hf:ID_OR_PATH[:LABEL][@prob|@logit], "
        "pm:DIR (a trained preference model), python:pkg.mod:fn or python:path/file.py:fn",
        required=True,
    )
    prompts: str = opt(
        None,
        'prompt spec: jsonl:PATH (one {"prompt": ...} object a line), chitchat[:toxic] or '
        "dialogsum[:PATH][@MIN-MAX]",
        required=True,
    )
    judge: str | None = opt(
        None, "independent gold judge for the guard's probes, never the reward (a reward spec)"
    )
    heldout_fraction: float = opt(
        0.25, "share of the prompt source held out (guard probes, evaluation), never trained on"
    )


def check_task(task: TaskOptions) -> None:
    if not 0 < task.heldout_fraction < 1:
        raise TetherError(f"heldout_fraction must be in (0, 1), got {task.heldout_fraction}")
    if task.judge is not None and task.judge == task.reward:
        raise TetherError(
            f"--judge {task.judge} is also the --reward: the gold judge must be independent"
        )


@dataclass
class SamplingOptions:
    """Sampling."""

    title: ClassVar[str] = "sampling"

    max_new_tokens: int = opt(48, "most tokens generated per completion")
    min_new_tokens: int = opt(0, "fewest tokens generated per completion")
    temperature: float = opt(1.0, "sampling temperature (also applied to the log-probs PPO uses)")
    top_k: int = opt(0, "top-k sampling (0 = off)")
    top_p: float = opt(1.0, "nucleus sampling (1.0 = off)")
    max_prompt_tokens: int = opt(512, "longer prompts are cut from the left (counted, warned)")
    chat_template: Literal["auto", "on", "off"] = opt(
        "auto",
        "wrap prompts in the tokenizer's chat template (auto: when it has one and the model is causal)",
    )


def check_sampling(sampling: SamplingOptions) -> None:
    at_least_one(
        max_new_tokens=sampling.max_new_tokens, max_prompt_tokens=sampling.max_prompt_tokens
    )
    if sampling.min_new_tokens > sampling.max_new_tokens:
        raise TetherError(
            f"min_new_tokens {sampling.min_new_tokens} exceeds max_new_tokens "
            f"{sampling.max_new_tokens}"
        )
    if sampling.temperature <= 0:
        raise TetherError(f"temperature must be > 0, got {sampling.temperature}")
    if not 0 < sampling.top_p <= 1:
        raise TetherError(f"top_p must be in (0, 1], got {sampling.top_p}")


@dataclass
class RLOptions:
    """The estimator and the PPO update."""

    title: ClassVar[str] = "the estimator and the PPO update"

    advantage: Advantage = opt(
        "gae",
        "advantage estimator: gae (PPO with a critic), grpo, rloo or reinforce++ (critic-free, "
        "no value head)",
    )
    group_size: int | None = opt(
        None,
        "completions sampled per prompt (a step samples batch_size / group_size prompts); "
        "unset: 4 for grpo and rloo, 1 otherwise",
    )
    grpo_std: bool = opt(
        True, "grpo: divide each group's advantages by its std (--no-grpo-std: Dr. GRPO)"
    )
    policy_loss: PolicyLoss = opt(
        "clip",
        "policy loss: clip (PPO's clipped surrogate), gspo (a sequence-level ratio, the geometric "
        "mean of the token ratios, clipped per completion; TRL importance_sampling_level="
        "sequence), cispo (a capped, stop-gradient ratio on a REINFORCE term; TRL loss_type="
        "cispo) or sapo (a soft gate in place of the clip; TRL loss_type=sapo)",
    )
    loss_aggregation: (
        Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] | None
    ) = opt(
        None,
        "policy loss over tokens: token-mean (DAPO), seq-mean-token-mean (GRPO as published) or "
        "seq-mean-token-sum-norm (Dr. GRPO's constant); unset: token-mean, seq-mean-token-mean "
        "for gspo and sapo as their papers have it (rloo: per completion)",
    )
    dynamic_sampling: bool = opt(
        False,
        "grpo/rloo: drop the groups whose completions all scored the same (no advantage) and "
        "sample more prompts until the batch is full (DAPO's dynamic sampling)",
    )
    max_extra_sampling_rounds: int = opt(
        4,
        "dynamic sampling: most extra rounds of sampling per step; a batch still short after "
        "them is filled with dropped groups",
    )
    missing_eos_penalty: float | None = opt(
        None, "subtract this from the score of a completion that ends without EOS (truncated)"
    )
    overlong_buffer: int | None = opt(
        None,
        "DAPO's soft overlong punishment: the last N tokens before max_new_tokens, over which a "
        "penalty grows linearly from 0 to overlong_penalty (TRL soft_punish_cache, DAPO "
        "L_cache); unset: off",
    )
    overlong_penalty: float = opt(
        1.0, "overlong punishment: the score penalty at max_new_tokens (DAPO's is 1)"
    )
    mask_truncated_completions: bool = opt(
        False, "leave completions that end without EOS out of the loss"
    )
    steps: int = opt(20, "PPO steps (each = one batch of rollouts + its update)")
    batch_size: int = opt(16, "completions generated and scored per step")
    mini_batch_size: int = opt(4, "completions per optimiser step")
    gradient_accumulation_steps: int | None = opt(
        None,
        "micro-batches per mini-batch (mini_batch_size must divide by it); unset: micro-batches "
        "of 2 completions on CPU (see benchmarks/ppo_step.py --memory), one micro-batch elsewhere",
    )
    ppo_epochs: int = opt(2, "passes over each batch of rollouts")
    forward_batch_size: int = opt(8, "sequences per no-grad log-prob pass (memory vs speed)")
    lr: float = opt(1e-4, "AdamW learning rate for the LoRA adapter and value head")
    lr_scheduler: Literal["constant", "linear", "cosine"] = opt(
        "constant", "learning-rate schedule over all optimiser steps"
    )
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "clip the global gradient norm to this (0 = off)")
    cliprange: float = opt(
        0.2, "PPO policy ratio clip epsilon; the lower one with --cliprange-high (TRL epsilon)"
    )
    cliprange_high: float | None = opt(
        None,
        "upper clip epsilon, DAPO's clip-higher (TRL epsilon_high; DAPO uses 0.28); cispo caps "
        "its weight at 1 + this (TRL's epsilon_high is the cap itself); unset: = cliprange",
    )
    sapo_temperature_pos: float = opt(
        1.0, "sapo: gate temperature for tokens with a positive advantage (TRL's name)"
    )
    sapo_temperature_neg: float = opt(1.05, "sapo: gate temperature for the others (TRL's name)")
    cliprange_value: float = opt(
        0.2, "value clip: how far a value may move from its rollout estimate"
    )
    vf_coef: float = opt(0.1, "weight of the value loss")
    gamma: float = opt(1.0, "discount over response tokens")
    lam: float = opt(0.95, "GAE lambda")
    whiten_advantages: bool = opt(True, "normalise advantages over each batch")
    score_norm: bool = opt(
        False,
        "normalise reward scores by their running mean and std over all steps so far (not per batch: "
        "a batch of near-equal scores is not blown up into a strong signal)",
    )
    early_stop_kl: float | None = opt(
        None, "stop the epoch loop when the mean approx-KL of a mini-batch exceeds this"
    )
    max_importance_ratio: float | None = opt(
        10.0,
        "skip a mini-batch whose mean per-token PPO ratio new/old (1 in expectation) exceeds "
        "this or falls below its inverse (counted as skipped_ratio; null in YAML: no check)",
    )
    max_consecutive_skips: int = opt(
        8,
        "stop with an error after this many mini-batches in a row were skipped (non-finite "
        "loss/gradients or extreme ratios); the last complete checkpoint is kept",
    )

    @property
    def has_critic(self) -> bool:
        """Only gae trains a value head; the critic-free estimators build none."""
        return self.advantage == "gae"


def check_rl(rl: RLOptions) -> None:
    at_least_one(
        steps=rl.steps,
        batch_size=rl.batch_size,
        mini_batch_size=rl.mini_batch_size,
        gradient_accumulation_steps=rl.gradient_accumulation_steps,  # None: the device's default
        ppo_epochs=rl.ppo_epochs,
        forward_batch_size=rl.forward_batch_size,
        group_size=rl.group_size,
    )
    if rl.batch_size % rl.mini_batch_size:
        raise TetherError(
            f"batch_size {rl.batch_size} is not divisible by mini_batch_size {rl.mini_batch_size}"
        )
    if rl.gradient_accumulation_steps and rl.mini_batch_size % rl.gradient_accumulation_steps:
        raise TetherError(
            f"mini_batch_size {rl.mini_batch_size} is not divisible by "
            f"gradient_accumulation_steps {rl.gradient_accumulation_steps}"
        )
    if rl.batch_size % rl.group_size:
        raise TetherError(
            f"batch_size {rl.batch_size} is not divisible by group_size {rl.group_size}"
        )
    if rl.advantage in ("grpo", "rloo") and rl.group_size < 2:
        raise TetherError(
            f"--advantage {rl.advantage} compares completions of the same prompt: "
            f"group_size must be >= 2, got {rl.group_size}"
        )
    if rl.advantage == "rloo" and rl.loss_aggregation is not None:
        raise TetherError(
            f"--loss-aggregation {rl.loss_aggregation}: rloo's loss is one clipped ratio per "
            "completion, averaged over completions; there are no tokens to aggregate"
        )
    if rl.lr <= 0:
        raise TetherError(f"lr must be > 0, got {rl.lr}")
    check_policy_loss(rl)
    if rl.dynamic_sampling and rl.advantage not in ("grpo", "rloo"):
        raise TetherError(
            f"--dynamic-sampling drops groups whose completions all scored the same, which carry "
            f"no group-relative advantage; --advantage {rl.advantage} has none: use grpo or rloo"
        )
    if rl.max_extra_sampling_rounds < 0:
        raise TetherError(
            f"max_extra_sampling_rounds must be >= 0, got {rl.max_extra_sampling_rounds}"
        )
    if rl.overlong_penalty < 0:
        raise TetherError(f"overlong_penalty must be >= 0, got {rl.overlong_penalty}")
    if rl.max_importance_ratio is not None and rl.max_importance_ratio <= 1:
        raise TetherError(f"max_importance_ratio must be > 1, got {rl.max_importance_ratio}")
    if rl.max_consecutive_skips < 1:
        raise TetherError(f"max_consecutive_skips must be >= 1, got {rl.max_consecutive_skips}")


def check_policy_loss(rl: RLOptions) -> None:
    """The policy losses' ranges and the estimators they do not fit, one line each."""
    if rl.cliprange <= 0:
        raise TetherError(f"cliprange must be > 0, got {rl.cliprange}")
    if rl.cliprange_high is not None and rl.cliprange_high <= 0:
        raise TetherError(f"cliprange_high must be > 0, got {rl.cliprange_high}")
    if rl.sapo_temperature_pos <= 0 or rl.sapo_temperature_neg <= 0:
        raise TetherError(
            f"sapo temperatures must be > 0, got {rl.sapo_temperature_pos}, "
            f"{rl.sapo_temperature_neg}"
        )
    if rl.policy_loss == "clip":
        return
    if rl.advantage == "rloo":
        raise TetherError(
            f"--policy-loss {rl.policy_loss}: rloo's loss is its own, one clipped ratio per "
            "completion (Ahmadian et al. 2024); use --advantage grpo"
        )
    if rl.policy_loss == "gspo" and rl.advantage == "gae":
        raise TetherError(
            "--policy-loss gspo weighs a completion by one sequence-level ratio; --advantage gae "
            "learns a per-token critic whose value loss has no such ratio: use grpo"
        )
    if rl.policy_loss == "gspo" and rl.advantage == "reinforce++":
        raise TetherError(
            "--policy-loss gspo needs one advantage per completion; --advantage reinforce++'s "
            "vary per token: use grpo"
        )


def check_rl_sampling(rl: RLOptions, max_new_tokens: int) -> None:
    """The options of the estimator that depend on the completions' length."""
    if rl.overlong_buffer is not None and not 1 <= rl.overlong_buffer <= max_new_tokens:
        raise TetherError(
            f"overlong_buffer must be in [1, max_new_tokens {max_new_tokens}], got "
            f"{rl.overlong_buffer}"
        )


@dataclass
class KLOptions:
    """The KL leash to the reference."""

    title: ClassVar[str] = "the KL leash to the reference"

    kl_coef: float = opt(0.05, "initial KL penalty coefficient beta")
    target_kl: float | None = opt(
        None, "adaptive KL: steer mean per-sequence KL (nats) toward this; unset = fixed beta"
    )
    kl_horizon: int = opt(10_000, "adaptive KL horizon in samples (Ziegler et al.)")
    kl_penalty: Literal["reward", "loss"] | None = opt(
        None,
        "where the KL penalty goes: into the reward (shaped per token) or into the loss (GRPO); "
        "unset: loss for grpo, reward otherwise",
    )
    kl_estimator: Literal["k1", "k2", "k3", "full"] | None = opt(
        None,
        "per-token KL: k1/k2/k3 from the sampled token, full = exact over the whole vocabulary "
        "(one more forward pass); unset: k3 in the loss, k1 in the reward",
    )
    kl_chunk_size: int = opt(
        128, "full KL: positions per chunk of the vocabulary-wide softmaxes (memory vs speed)"
    )
    kl_bias_correction: bool = opt(
        False,
        "k3 in the loss weighted by the importance ratio pi / pi_old, whose gradient is unbiased "
        "for KL(policy || reference) (TRL use_bias_correction_kl, on by default there); off: "
        "plain k3, whose gradient is that of KL(reference || policy)",
    )


def check_kl(kl: KLOptions) -> None:
    at_least_one(kl_chunk_size=kl.kl_chunk_size)
    if kl.target_kl is not None and kl.target_kl <= 0:
        raise TetherError(f"target_kl must be > 0, got {kl.target_kl}")
    if kl.kl_coef < 0:
        raise TetherError(f"kl_coef must be >= 0, got {kl.kl_coef}")


def resolve_rl(rl: RLOptions, kl: KLOptions) -> None:
    """The estimator-dependent defaults, resolved once after parsing, in place (a command's
    __post_init__ calls it; config.yaml saves them resolved)."""
    if rl.group_size is None:
        rl.group_size = 4 if rl.advantage in ("grpo", "rloo") else 1
    if rl.loss_aggregation is None and rl.advantage != "rloo":
        # GSPO (Zheng et al. 2025, eq. 5) and SAPO average over completions, as TRL runs them
        per_sequence = rl.policy_loss in ("gspo", "sapo")
        rl.loss_aggregation = "seq-mean-token-mean" if per_sequence else "token-mean"
    if kl.kl_penalty is None:
        kl.kl_penalty = "loss" if rl.advantage == "grpo" else "reward"
    if kl.kl_estimator is None:
        kl.kl_estimator = "k3" if kl.kl_penalty == "loss" else "k1"


def check_rl_kl(rl: RLOptions, kl: KLOptions) -> None:
    """The estimator's combinations with the KL that do not make sense, one line each."""
    if kl.kl_penalty == "loss" and kl.kl_estimator == "k1":
        raise TetherError(
            "--kl-estimator k1 in the loss has zero expected gradient (E[grad log pi] = 0 on "
            "policy samples): use k2, k3 or full with --kl-penalty loss"
        )
    if kl.kl_bias_correction and (kl.kl_penalty, kl.kl_estimator) != ("loss", "k3"):
        raise TetherError(
            f"--kl-bias-correction weights k3 in the loss; got --kl-penalty {kl.kl_penalty} "
            f"--kl-estimator {kl.kl_estimator}: use --kl-penalty loss --kl-estimator k3"
        )
    if kl.kl_penalty == "loss" and rl.advantage == "reinforce++":
        raise TetherError(
            "--advantage reinforce++ puts the KL penalty in the token rewards by definition "
            "(Hu 2025); drop --kl-penalty loss"
        )
    if kl.kl_penalty == "loss" and rl.advantage == "rloo":
        raise TetherError(
            "--advantage rloo treats a completion as one action and puts its KL in the reward "
            "(Ahmadian et al. 2024); drop --kl-penalty loss"
        )


@dataclass
class GuardOptions:
    """The reward-hacking guard (see guard.py)."""

    title: ClassVar[str] = "the reward-hacking guard (see guard.py)"

    judge_every: int = opt(
        10, "probe held-out prompts every N steps: proxy vs gold, phrases, fluency (0 = off)"
    )
    probe_prompts: int = opt(32, "held-out prompts in the guard's fixed probe set")
    kl_budget: float | None = opt(None, "flag KL to the reference above this (nats/sequence)")
    on_hack: Literal["warn", "stop", "rollback"] = opt(
        "warn", "when the guard flags hacking: warn, stop the run, or roll back to best/ and stop"
    )


def check_guard(guard: GuardOptions) -> None:
    if guard.judge_every < 0 or guard.probe_prompts < 1:
        raise TetherError(
            f"judge_every must be >= 0 and probe_prompts >= 1, got {guard.judge_every}, "
            f"{guard.probe_prompts}"
        )
    if guard.kl_budget is not None and guard.kl_budget <= 0:
        raise TetherError(f"kl_budget must be > 0, got {guard.kl_budget}")


@dataclass
class TrainingOptions:
    """Seeds, checkpoints and tracking."""

    title: ClassVar[str] = "seeds, checkpoints and tracking"

    seed: int = opt(0, "seed for data order, sampling and initialisation")
    save_every: int = opt(10, "write checkpoints/step-N every N steps (0 = only final/)")
    resume: bool = opt(False, "continue from the last complete checkpoint in --out")
    force: bool = opt(
        False, "with --resume: continue even though --out was written with a different config"
    )
    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] = opt(
        "none",
        "also send the metrics to this tracker through Accelerate (metrics.jsonl is always written; "
        "tensorboard: RUN/tensorboard/)",
    )


@dataclass
class EvalOptions:
    """Evaluation on held-out prompts."""

    title: ClassVar[str] = "evaluation on held-out prompts"

    eval_prompts: int = opt(
        64, "held-out prompts evaluated before and after (fewer only if the split has fewer)"
    )
    eval_batch_size: int = opt(16, "prompts per generation batch in evaluation")
    eval_seed: int = opt(1234, "seed of the evaluation sampling (the same before and after)")
    eval_samples: int = opt(
        4,
        "completions sampled per held-out prompt: the report adds each toxicity's expected "
        "maximum over them and the share of prompts with one at --toxicity-threshold or above "
        "(RealToxicityPrompts samples 25)",
    )
    toxicity_threshold: float = opt(
        0.5, "a completion this toxic or more counts as toxic (Toxicity Probability)"
    )
    similarity: bool = opt(
        True, "measure completion-prompt embedding similarity (all-MiniLM-L6-v2)"
    )
    transfer_prompts: str = opt(
        "auto",
        "a second held-out pool that no step of the run chose, evaluated before and after the "
        "same way: a prompt spec (its held-out split), none, or auto (chitchat:toxic -> "
        "chitchat:rest, the dialogues the toxic pool left out; otherwise none)",
    )
    transfer_eval_prompts: int = opt(
        32, "prompts of the second pool, drawn at random (by --eval-seed) from its held-out split"
    )


def check_eval(ev: EvalOptions) -> None:
    if ev.eval_prompts < 1 or ev.eval_batch_size < 1:
        raise TetherError(
            f"eval_prompts and eval_batch_size must be >= 1, got {ev.eval_prompts}, "
            f"{ev.eval_batch_size}"
        )
    if ev.transfer_eval_prompts < 1:
        raise TetherError(f"transfer_eval_prompts must be >= 1, got {ev.transfer_eval_prompts}")
    if ev.eval_samples < 1:
        raise TetherError(f"eval_samples must be >= 1, got {ev.eval_samples}")
    if not 0 < ev.toxicity_threshold <= 1:
        raise TetherError(f"toxicity_threshold must be in (0, 1], got {ev.toxicity_threshold}")
