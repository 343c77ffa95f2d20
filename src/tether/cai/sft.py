"""Stage 2, SL-CAI: LoRA supervised fine-tuning on (red-team prompt, final revision), with TRL's
SFTTrainer (Bai et al. 2022, sec. 3). The loss covers the answer only (prompt-completion data);
with a chat template the pair is a user turn and an assistant turn, the form the policy, the
preference model and PPO see later.

The adapter it saves is the starting point of RL-CAI: `tether train --adapter DIR` merges it
into the base, so PPO's KL reference is the SL-CAI model, not the raw base.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, TaskType

from tether.errors import TetherError
from tether.models import LoadedModel
from tether.policy import default_lora_targets


def sft_example(tokenizer: Any, prompt: str, answer: str) -> dict[str, Any]:
    """One prompt-completion example: conversational when the tokenizer has a chat template,
    else the plain "Human: / Assistant:" text the CAI stages use."""
    if tokenizer.chat_template:
        return {
            "prompt": [{"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": answer}],
        }
    return {"prompt": f"Human: {prompt}\n\nAssistant:", "completion": f" {answer}"}


def train_sl_cai(
    loaded: LoadedModel,
    examples: list[tuple[str, str]],
    out: Path,
    epochs: int,
    lr: float,
    batch_size: int,
    lora_r: int,
    lora_alpha: int,
    seed: int,
    max_length: int = 384,
    progress: bool = False,
) -> dict[str, Any]:
    """Fine-tune a LoRA adapter on (prompt, answer) pairs and save it (PEFT format) to `out`.
    Returns the training log's summary (loss per logging step, runtime). The adapter is
    injected into `loaded.model` in place: load the model afresh for anything else."""
    if loaded.is_encoder_decoder:
        raise TetherError(
            "SL-CAI uses TRL's SFTTrainer, which trains causal LMs only; use a causal --policy"
        )
    import datasets
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bar()  # four "Tokenizing..." bars per run drown the stage's own

    data = datasets.Dataset.from_list([sft_example(loaded.tokenizer, p, a) for p, a in examples])
    # transformers 5 / peft 0.21 deprecation notices from inside TRL: not ours to fix
    on_cuda = loaded.model.device.type == "cuda"
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as scratch:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        args = SFTConfig(
            output_dir=scratch,  # nothing is saved there: save_strategy "no"
            num_train_epochs=epochs,
            per_device_train_batch_size=batch_size,
            learning_rate=lr,
            lr_scheduler_type="constant",
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=not progress,
            seed=seed,
            max_length=max_length,
            use_cpu=loaded.model.device.type == "cpu",
            dataloader_pin_memory=False,
            # TRL's SFTConfig turns both on by default. bf16 autocast on a CPU without bf16
            # units made a step of 4 examples take ~90 s instead of a few; checkpointing only
            # trades time for activation memory that a LoRA fine-tune of a small model has.
            bf16=on_cuda and torch.cuda.is_bf16_supported(),
            gradient_checkpointing=False,
        )
        lora = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=lora_r,
            lora_alpha=lora_alpha,
            target_modules=default_lora_targets(loaded.model),
        )
        trainer = SFTTrainer(
            model=loaded.model,
            args=args,
            train_dataset=data,
            processing_class=loaded.tokenizer,
            peft_config=lora,
        )
        if not progress:
            trainer.remove_callback(PrinterCallback)  # it prints every log dict
        result = trainer.train()
        trainer.model.save_pretrained(out, safe_serialization=True)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {"losses": losses, "train_runtime": result.metrics.get("train_runtime")}
