"""Any Hugging Face sequence classifier as a reward or judge: `hf:ID_OR_PATH[:LABEL][@logit|@prob]`.

The walkthrough's reward is `facebook/roberta-hate-speech-dynabench-r4-target`, scored as the raw
logit of its `nothate` label: `hf:facebook/roberta-hate-speech-dynabench-r4-target:nothate@logit`.
The label is chosen by *name* from the model's `id2label`, never by index, because label order
differs between checkpoints and a silent index mix-up trains the policy toward the wrong class.

    prob    reward = P(label): softmax over the labels (sigmoid for a single-output or
            multi-label head); bounded in [0, 1]
    logit   reward = the raw logit of the label; unbounded, and not squashed near 0 or 1, which
            is where a policy that is already mostly clean lives

Only the completion is scored, as the profanity reward does: the classifier judges what the
policy says, not the prompt it was given. Texts are scored in batches; a text longer than the
classifier's window is cut to it (counted, and warned once per call).
"""

from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tether.errors import TetherError
from tether.models import load_config, resolve_device

MODES = ("prob", "logit")
# A tokenizer without a usable model_max_length reports ~1e30; no classifier reads that far.
_FALLBACK_MAX_TOKENS = 512


def parse_hf_spec(rest: str) -> tuple[str, str | None, str]:
    """`ID_OR_PATH[:LABEL][@logit|@prob]` (after the `hf:`) -> (model, label or None, mode)."""
    model, mode = rest, "prob"
    head, sep, tail = rest.rpartition("@")
    if sep and tail in MODES:
        model, mode = head, tail
    elif sep and "/" not in tail and ":" not in tail:
        raise TetherError(f"hf reward mode {tail!r} unknown; expected one of {MODES}")
    # a label never holds '/', so 'a/b:c' splits at the last ':' and a bare path keeps its own
    location, sep, label = model.rpartition(":")
    if sep and location and label and "/" not in label:
        model, chosen = location, label
    else:
        chosen = None
    if not model:
        raise TetherError(
            f"hf reward spec 'hf:{rest}': expected hf:ID_OR_PATH[:LABEL][@logit|@prob]"
        )
    return model, chosen, mode


class HFClassifierReward:
    """Reward = the chosen label's probability or logit under a sequence classifier."""

    def __init__(
        self,
        model: str,
        label: str | None = None,
        mode: str = "prob",
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        max_tokens: int | None = None,
        trust_remote_code: bool = False,
        allow_bin_weights: bool = False,
    ) -> None:
        if mode not in MODES:
            raise TetherError(f"hf reward mode {mode!r} unknown; expected one of {MODES}")
        self.name = f"hf:{model}" + (f":{label}" if label else "") + f"@{mode}"
        self.mode = mode
        self.batch_size = batch_size
        self.device = resolve_device(device) if isinstance(device, str) else device
        config = load_config(model, model, "reward model", trust_remote_code)
        labels = {int(i): str(name) for i, name in (config.id2label or {}).items()}
        if label is None:
            if config.num_labels != 1:
                raise TetherError(
                    f"reward model {model!r} has labels {sorted(labels.values())}: choose one "
                    f"by name, e.g. hf:{model}:{labels.get(0, 'LABEL')}@{mode}"
                )
            self.column = 0
        else:
            by_name = {name: i for i, name in labels.items()}
            if label not in by_name:
                raise TetherError(
                    f"reward model {model!r} has no label {label!r}; its labels are "
                    f"{sorted(labels.values())}"
                )
            self.column = by_name[label]
        # one output or independent labels: each is its own yes/no, so sigmoid, not softmax
        self._sigmoid = (
            config.num_labels == 1 or config.problem_type == "multi_label_classification"
        )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                model, trust_remote_code=trust_remote_code
            )
            # safetensors only unless allowed: a .bin is a pickle (read with weights_only=True)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                model,
                trust_remote_code=trust_remote_code,
                use_safetensors=None if allow_bin_weights else True,
            )
        except (OSError, ValueError) as e:
            raise TetherError(
                f"cannot load reward model {model!r} as a sequence classifier: "
                f"{str(e).splitlines()[0]}"
            ) from None
        self.model.to(self.device).eval()
        limit = self.tokenizer.model_max_length
        self.max_tokens = max_tokens or (limit if limit < 100_000 else _FALLBACK_MAX_TOKENS)
        self.truncated = 0  # texts cut to max_tokens so far, over all calls

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        texts = list(completions)
        if not texts:
            return []
        # verbose=False: counting is the point here; transformers would warn once per process
        lengths = [len(ids) for ids in self.tokenizer(texts, verbose=False)["input_ids"]]
        n_cut = sum(n > self.max_tokens for n in lengths)
        if n_cut:
            self.truncated += n_cut
            tqdm.write(
                f"warning: {self.name}: {n_cut} of {len(texts)} texts longer than "
                f"{self.max_tokens} tokens were truncated ({self.truncated} so far)",
                file=sys.stderr,
            )
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[i : i + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(**enc).logits.float()  # (b, labels)
            if self.mode == "logit":
                values = logits[:, self.column]
            elif self._sigmoid:
                values = torch.sigmoid(logits[:, self.column])
            else:
                values = torch.softmax(logits, dim=-1)[:, self.column]
            out.extend(values.tolist())
        return out
