"""One policy interface for causal and seq2seq LMs: base model + LoRA adapter (+ value head).

The reference is the same base weights with the adapter disabled (`with policy.reference():`),
so only one model sits in memory. A starting SFT adapter is merged into the base first, which
makes the reference the *starting policy*, not the raw base.

Everything causal-vs-seq2seq lives here, and so does the multi-process engine the policy runs on
(`distribute`: DDP or FSDP2, see tether.distributed); the trainer never asks which kind it has.
Sampling is tether.fastpath's `sample`, the one generation path, fast or plain (`fast_path`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, TaskType, get_peft_model, set_peft_model_state_dict
from peft.utils import load_peft_weights
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from tether import distributed, fastpath, ppo
from tether.errors import TetherError
from tether.models import LoadedModel, merge_adapter
from tether.rollout import Rollout, SamplingParams, pad_cat, response_valid_mask

VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | None = (
        None  # None: PEFT's per-architecture default, else all-linear
    )


@dataclass
class PolicyOutput:
    """Per response token, all (b, t): log-probs of the taken tokens, values and entropy of the
    full next-token distribution (no grad), each None when not asked for; `logits` (b, t, v),
    divided by the temperature like the log-probs, only when asked for (the full KL)."""

    logprobs: torch.Tensor
    values: torch.Tensor | None
    entropy: torch.Tensor | None
    logits: torch.Tensor | None = None

    def masked(self, valid_mask: torch.Tensor) -> PolicyOutput:
        """Log-probs, values and entropy with 0 past each row's end (no logits)."""
        keep = valid_mask.bool()

        def zeroed(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else torch.where(keep, x, torch.zeros_like(x))

        return PolicyOutput(zeroed(self.logprobs), zeroed(self.values), zeroed(self.entropy))

    def select(self, idx: torch.Tensor, t: int) -> PolicyOutput:
        """Rows `idx`, the first `t` response columns (as `Rollout.select` trims them); no
        logits."""

        def rows(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[idx, :t]

        return PolicyOutput(rows(self.logprobs), rows(self.values), rows(self.entropy))

    @staticmethod
    def cat(outputs: list[PolicyOutput]) -> PolicyOutput:
        """The rows of several outputs as one, right-padded with 0 (no logits)."""

        def cat(xs: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if xs[0] is None else pad_cat(xs, 0.0)

        return PolicyOutput(
            cat([o.logprobs for o in outputs]),
            cat([o.values for o in outputs]),
            cat([o.entropy for o in outputs]),
        )


class Policy(torch.nn.Module):
    """A language model with a trainable LoRA adapter, a value head when the estimator has a
    critic (`value_head=False`: none is built, trained or saved), and a free reference.

    `fast_path`: sample and run the lm_head through tether.fastpath's CPU fast path (True) or
    plain Hugging Face generate() (False); None: on unless $TETHER_FAST_PATH is 0."""

    def __init__(
        self,
        loaded: LoadedModel,
        lora: LoraSettings = LoraSettings(),
        adapter: str | None = None,
        reference: str = "shared",
        temperature: float = 1.0,
        max_prompt_tokens: int = 512,
        chat_template: str = "auto",
        value_head: bool = True,
        fast_path: bool | None = None,
    ) -> None:
        super().__init__()
        base = loaded.model
        self.fast_path = fastpath.enabled(fast_path)
        self.tokenizer = loaded.tokenizer
        self.is_encoder_decoder = loaded.is_encoder_decoder
        self.temperature = temperature
        self.max_prompt_tokens = max_prompt_tokens
        # Left padding lets a causal batch generate from a common right edge.
        self.tokenizer.padding_side = "right" if self.is_encoder_decoder else "left"
        self.tokenizer.truncation_side = (
            "left"  # keep the end of a prompt: the question/instruction
        )
        self.use_chat_template = chat_template == "on" or (
            chat_template == "auto"
            and not self.is_encoder_decoder
            and bool(self.tokenizer.chat_template)
        )
        if chat_template == "on" and not self.tokenizer.chat_template:
            raise TetherError("--chat-template on, but the tokenizer has no chat template")

        if adapter is not None:
            base = merge_adapter(base, adapter)
        for p in base.parameters():
            p.requires_grad_(False)
        self._ref_model = None
        self._use_copy = False  # inside reference() with a full-copy reference
        if reference == "full-copy":
            # A second frozen model, as TRL's old PPOTrainer did without PEFT: for benchmarks.
            self._ref_model = copy.deepcopy(base).eval()
        elif reference != "shared":
            raise TetherError(f"reference must be 'shared' or 'full-copy', got {reference!r}")

        task = TaskType.SEQ_2_SEQ_LM if self.is_encoder_decoder else TaskType.CAUSAL_LM
        lora_cfg = LoraConfig(
            task_type=task,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=peft_targets(lora.target_modules) or default_lora_targets(base),
        )
        try:
            with warnings.catch_warnings():  # peft 0.21 calls a transformers 5 deprecated alias
                warnings.filterwarnings("ignore", category=FutureWarning)
                self.model = get_peft_model(base, lora_cfg)
        except ValueError as e:
            raise TetherError(f"cannot put LoRA on {lora_cfg.target_modules}: {e}") from None
        self._device = base.device
        self.value_head: torch.nn.Linear | None = None
        if value_head:
            hidden = base.get_output_embeddings().in_features
            self.value_head = torch.nn.Linear(hidden, 1, dtype=torch.float32, device=base.device)
            # V = 0 at the start: the first advantages are then the raw returns, not noise.
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)

        # The lm_head's input is the final hidden state (after the last norm, and after T5's
        # d_model**-0.5 rescale): the value head reads it there, so one pass gives both.
        self._hidden: torch.Tensor | None = None
        self._gen_hidden: list[torch.Tensor] | None = None
        self._sampling = False  # inside generate(): the hook keeps nothing without a value head
        base.get_output_embeddings().register_forward_pre_hook(self._capture_hidden)
        if self.fast_path:  # oneDNN's linears on the CPU only (`fastpath.onednn_applies`)
            fastpath.use_onednn_linears(base)
            if self._ref_model is not None:
                fastpath.use_onednn_linears(self._ref_model)
        # Causal LMs that accept logits_to_keep skip the (b, p, v) prompt logits entirely.
        self._keeps_logits = (
            not self.is_encoder_decoder
            and "logits_to_keep" in inspect.signature(type(base).forward).parameters
        )
        # Dropout off everywhere: rollouts, log-prob passes and the update all see the same
        # function, so the first PPO ratio is exactly 1 and KL is not dropout noise.
        self.eval()

        # the multi-process engine (`distribute`); "none": plain modules in one process
        self.engine: distributed.Engine = "none"
        self._replica: torch.nn.Module | None = None  # the DDP-wrapped trainable pass

        gen = base.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_token_ids: list[int] = [eos] if isinstance(eos, int) else list(eos)
        self.decoder_start_token_id = getattr(base.config, "decoder_start_token_id", None)

    # ------------------------------------------------------------------------------------------

    def _capture_hidden(self, module: torch.nn.Module, args: tuple) -> None:
        if self._gen_hidden is not None:
            # during generate(): each decoding step feeds the lm_head the state that predicts
            # the next token, i.e. exactly the state whose value PPO needs
            self._gen_hidden.append(args[0][:, -1:])
        elif not self._sampling:
            # (sampling without a value head keeps no tensor across decoding steps)
            self._hidden = args[0]

    @property
    def _active_model(self) -> torch.nn.Module:
        """The module that generates and scores now: the full-copy reference inside
        `reference()`, else the adapter-wrapped model (whose adapter reference() may disable)."""
        return self._ref_model if self._use_copy else self.model

    @property
    def device(self) -> torch.device:
        return self._device

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """LoRA matrices and the value head (if any): nothing else ever gets a gradient."""
        return [p for p in self.parameters() if p.requires_grad]

    def distribute(self, engine: distributed.Engine) -> None:
        """Put the policy on a multi-process engine, once, before an optimiser takes its
        parameters (FSDP2 replaces them with sharded ones); `none` leaves it as it is.

        - `ddp`: `forward` runs through torch's DDP around the trainable pass (the adapted model
          and the value head), whose hooks average the gradients over processes;
        - `fsdp2`: every transformer block (`_no_split_modules`: Llama's decoder layers, T5's
          encoder and decoder blocks), the model's root, a full-copy reference and the value head
          are `fully_shard`ed; `generate`, `forward` and `reference()` keep working on the
          shards, and `save` / `load_trainable` read and write full (gathered) tensors.
        """
        if engine == self.engine or engine == "none":
            return
        if self.engine != "none":
            raise RuntimeError(f"the policy already runs on {self.engine}, not {engine}")
        if engine == "ddp":
            # not a registered submodule: its parameters are the policy's own, listed once
            object.__setattr__(self, "_replica", distributed.replicate(_TrainablePass(self)))
        elif engine == "fsdp2":
            base = self.model.get_base_model()
            blocks = list(getattr(base, "_no_split_modules", None) or [])
            distributed.shard(self.model, blocks)
            if self._ref_model is not None:
                distributed.shard(self._ref_model, blocks)
            if self.value_head is not None:
                distributed.shard(self.value_head)
        else:
            raise ValueError(f"unknown engine {engine!r}")
        self.engine = engine

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward: the gradients add up in this process,
        and are reduced over processes only on the `last` micro-batch of a mini-batch (DDP's
        `no_sync`, FSDP2's `set_requires_gradient_sync`). Nothing to do in one process."""
        if self.engine == "ddp" and not last:
            with self._replica.no_sync():
                yield
            return
        if self.engine == "fsdp2":
            for module in self._sharded_roots():
                module.set_requires_gradient_sync(last)
        yield

    def _sharded_roots(self) -> list[torch.nn.Module]:
        """The FSDP2 roots whose parameters train: the adapted model and the value head."""
        return [self.model] + ([self.value_head] if self.value_head is not None else [])

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Inside this block, `forward` and `generate` are the starting policy."""
        if self._ref_model is not None:
            self._use_copy = True
            try:
                yield
            finally:
                self._use_copy = False
        else:
            with self.model.disable_adapter():
                yield

    @torch.no_grad()
    def reference_logprobs(
        self, rollout: Rollout, temperature: float | None = None, batch_size: int | None = None
    ) -> torch.Tensor:
        """(b, t) log-probs of the response under the reference (the adapter disabled) at
        `temperature` (None: the sampling temperature). `batch_size` None: one pass over the
        rollout as it is; else chunks of that many rows of similar length, each trimmed of the
        padding no row in it needs (`Rollout.select`)."""
        with self.reference():
            return self.score(rollout, False, temperature, batch_size).logprobs

    @torch.no_grad()
    def score(
        self,
        rollout: Rollout,
        with_values: bool,
        temperature: float | None = None,
        batch_size: int | None = None,
    ) -> PolicyOutput:
        """`forward` without gradient, in chunks of `batch_size` rows of similar length (None:
        one pass): log-probs, and values where asked for, (b, t), 0 past a chunk's longest row."""
        if batch_size is None:
            return self(rollout, with_values=with_values, temperature=temperature)
        shape, device = rollout.response_ids.shape, rollout.response_ids.device
        logprobs = torch.zeros(shape, device=device)
        values = None
        if with_values and self.value_head is not None:
            values = torch.zeros(shape, device=device)
        for idx in rollout.rows_by_length().split(batch_size):
            out = self(rollout.select(idx), with_values=with_values, temperature=temperature)
            logprobs[idx, : out.logprobs.shape[1]] = out.logprobs
            if values is not None:
                values[idx, : out.values.shape[1]] = out.values
        return PolicyOutput(logprobs, values, None)

    # ------------------------------------------------------------------------------------------
    # prompts and generation
    # ------------------------------------------------------------------------------------------

    def format_prompts(self, prompts: list[str]) -> list[str]:
        """The text the model sees: the chat template around each prompt when enabled."""
        if not self.use_chat_template:
            return prompts
        return [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            )
            for p in prompts
        ]

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Tokenise and pad prompts.

        Returns:
            prompt_ids (b, p), prompt_mask (b, p), and how many prompts were cut to max_prompt_tokens.
        """
        texts = self.format_prompts(prompts)
        # The chat template already carries BOS and friends; don't add them twice.
        add_special = not self.use_chat_template
        lengths = [
            len(ids) for ids in self.tokenizer(texts, add_special_tokens=add_special)["input_ids"]
        ]
        enc = self.tokenizer(
            texts,
            add_special_tokens=add_special,
            padding=True,
            truncation=True,
            max_length=self.max_prompt_tokens,
            return_tensors="pt",
        )
        n_truncated = sum(n > self.max_prompt_tokens for n in lengths)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device), n_truncated

    @torch.no_grad()
    def generate(
        self, prompts: list[str], sampling: SamplingParams
    ) -> tuple[Rollout, PolicyOutput, int]:
        """Sample one completion per prompt, batched, with the KV cache.

        The sampling pass also yields what PPO needs from the rollout policy, so no second
        forward is spent on it: log-probs of the sampled tokens (from the raw logits / temperature,
        the distribution they were drawn from when top-k/top-p are off), entropy, and values from
        the hidden states captured at the lm_head.

        Returns:
            the rollout; its (b, t) log-probs, values (None without a value head or for a
            full-copy reference), entropy; and the number of prompts truncated to max_prompt_tokens.
        """
        prompt_ids, prompt_mask, n_truncated = self.encode_prompts(prompts)
        self._gen_hidden = [] if self.value_head is not None else None
        self._sampling = True
        try:
            sampled = fastpath.sample(
                self._active_model,
                prompt_ids,
                prompt_mask,
                sampling,
                self.temperature,
                self.eos_token_ids,
                self.tokenizer.pad_token_id,
                self.decoder_start_token_id,
                fast=self.fast_path,
                sharded=self.engine == "fsdp2",
                # the value head's states are kept across steps: no CUDA graphs under them
                compile_ok=self.value_head is None,
            )
        finally:
            hidden_steps, self._gen_hidden = self._gen_hidden or [], None
            self._sampling = False
        response_ids = sampled.response_ids
        valid_mask = response_valid_mask(response_ids, self.eos_token_ids)
        completions = self.decode(response_ids, valid_mask)
        last_token = response_ids.gather(1, ppo.last_valid_index(valid_mask).unsqueeze(1))
        finished = torch.isin(
            last_token.squeeze(1), torch.tensor(self.eos_token_ids).to(response_ids)
        )
        rollout = Rollout(
            prompt_ids, prompt_mask, response_ids, valid_mask, list(prompts), completions, finished
        )

        logprobs, entropy = sampled.logprobs, sampled.entropy
        values = None
        t = response_ids.shape[1]
        # (synced_gpus' extra passes append states past the end: only the first t are steps)
        if self.value_head is not None and len(hidden_steps) >= t:
            values = self.value_head(torch.cat(hidden_steps[:t], dim=1).float()).squeeze(-1)
        return rollout, PolicyOutput(logprobs, values, entropy).masked(valid_mask), n_truncated

    def decode(self, response_ids: torch.Tensor, valid_mask: torch.Tensor) -> list[str]:
        lengths = valid_mask.sum(-1).tolist()
        return [
            self.tokenizer.decode(ids[:n], skip_special_tokens=True).strip()
            for ids, n in zip(response_ids.tolist(), lengths, strict=True)
        ]

    # ------------------------------------------------------------------------------------------
    # the one forward pass
    # ------------------------------------------------------------------------------------------

    def forward(
        self,
        rollout: Rollout,
        with_values: bool = True,
        temperature: float | None = None,
        with_entropy: bool = False,
        with_logits: bool = False,
    ) -> PolicyOutput:
        """Log-probs (and values where there is a value head, entropy and logits when asked) of
        the response tokens in one pass over prompt + response.

        Gradients flow when called under grad mode; entropy never carries one, and is off by
        default: PPO logs the rollout's entropy from the sampling pass, and another softmax over
        (b, t, V) logits per pass costs time for nothing. `temperature` overrides the sampling
        temperature (perplexity is measured at 1). Under DDP the pass runs through the DDP
        wrapper, whose hooks then reduce the gradients of its backward.
        """
        run = self._replica if self._replica is not None else self._forward
        return run(rollout, with_values, temperature, with_entropy, with_logits)

    def _forward(
        self,
        rollout: Rollout,
        with_values: bool,
        temperature: float | None,
        with_entropy: bool,
        with_logits: bool,
    ) -> PolicyOutput:
        model = self._active_model
        self._hidden = None
        t = rollout.response_ids.shape[1]
        if self.is_encoder_decoder:
            # decoder input = [start, y_1 .. y_{t-1}] predicts [y_1 .. y_t]
            start = torch.full_like(rollout.response_ids[:, :1], self.decoder_start_token_id)
            decoder_input_ids = torch.cat([start, rollout.response_ids[:, :-1]], dim=1)
            decoder_mask = torch.cat([torch.ones_like(start), rollout.valid_mask[:, :-1]], dim=1)
            out = model(
                input_ids=rollout.prompt_ids,
                attention_mask=rollout.prompt_mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_mask,
                use_cache=False,
            )
            logits, hidden = out.logits, self._hidden
        else:
            input_ids = torch.cat([rollout.prompt_ids, rollout.response_ids], dim=1)
            attention_mask = torch.cat([rollout.prompt_mask, rollout.valid_mask], dim=1)
            # Positions count real tokens only, as generate() did, so left padding changes nothing.
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            # Only the last t+1 positions matter: the one before the response predicts y_1, and
            # the last one (predicting past the end) is dropped. Skips (b, p, v) prompt logits.
            keep = {"logits_to_keep": t + 1} if self._keeps_logits else {}
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                **keep,
            )
            logits = out.logits[:, -(t + 1) : -1]
            hidden = self._hidden[:, -(t + 1) : -1] if self._hidden is not None else None
        temperature = temperature or self.temperature
        logits = logits.float() if temperature == 1.0 else logits.float() / temperature
        logprobs = ppo.logprobs_from_logits(logits, rollout.response_ids)
        entropy = None
        if with_entropy:
            with torch.no_grad():
                entropy = ppo.entropy_from_logits(logits)
        values = None
        if with_values and self.value_head is not None:
            if hidden is None:
                raise RuntimeError("value head saw no hidden state: the lm_head hook did not fire")
            values = self.value_head(hidden.float()).squeeze(-1)
        self._hidden = None
        return PolicyOutput(logprobs, values, entropy, logits if with_logits else None)

    # ------------------------------------------------------------------------------------------
    # persistence: the adapter (PEFT format) and the value head, both safetensors
    # ------------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """The adapter (PEFT's format) and the value head, as one process would write them:
        under FSDP2 the shards are gathered first, so every process must call it."""
        directory = Path(directory)
        adapter = None  # None: PEFT takes the model's own state dict
        head = self.value_head.state_dict() if self.value_head is not None else None
        if self.engine == "fsdp2":
            # the trainable tensors only: the frozen base is never gathered
            full = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
            adapter = get_model_state_dict(self.model, options=full)
            if head is not None:
                head = get_model_state_dict(self.value_head, options=full)
        self.model.save_pretrained(directory, safe_serialization=True, state_dict=adapter)
        if head is not None:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in head.items()},
                directory / VALUE_HEAD_FILE,
            )

    @torch.no_grad()
    def reset_adapter(self) -> None:
        """Back to the starting policy: LoRA's B matrices (so every adapter delta) and the value
        head to zero, as they were built."""
        for name, p in self.model.named_parameters():
            if "lora_B" in name:
                p.zero_()
        if self.value_head is not None:
            self.value_head.weight.zero_()
            self.value_head.bias.zero_()

    def load_trainable(self, directory: str | Path) -> None:
        """Restore adapter and value head (a policy without one reads only the adapter) saved by
        `save` (resume, evaluation); safetensors only, as `save` writes them (never a pickled
        adapter_model.bin). Under FSDP2 each process keeps its shard of the full tensors read."""
        directory = Path(directory)
        if not (directory / "adapter_model.safetensors").is_file():
            raise TetherError(f"{directory} holds no adapter_model.safetensors (tether's format)")
        set_peft_model_state_dict(
            self.model, load_peft_weights(str(directory), device=str(self.device))
        )
        if self.value_head is not None:
            self.value_head.load_state_dict(
                load_file(directory / VALUE_HEAD_FILE, device=str(self.device))
            )


class _TrainablePass(torch.nn.Module):
    """What DDP wraps: the adapted model and the value head, i.e. every parameter that trains,
    with the policy's own pass as its forward (DDP hooks the parameters of the module it wraps,
    and only sees a backward when the forward ran through it)."""

    def __init__(self, policy: Policy) -> None:
        super().__init__()
        self.model = policy.model
        self.value_head = policy.value_head
        self.run = policy._forward

    def forward(self, *args, **kwargs) -> PolicyOutput:
        return self.run(*args, **kwargs)


def peft_targets(names: list[str] | None) -> list[str] | str | None:
    """Module names as PEFT takes them: PEFT's one special value (`all-linear`: every linear
    layer but the output head) is a string, not a module named "all-linear"."""
    if names is not None and len(names) == 1 and names[0].lower() == "all-linear":
        return "all-linear"
    return names


def default_lora_targets(model: torch.nn.Module) -> list[str] | str:
    """PEFT's per-architecture default (q/v attention projections for Llama, T5, ...), else all
    linear layers, so an architecture PEFT has not heard of still gets an adapter."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    return mapping.get(model.config.model_type, "all-linear")
