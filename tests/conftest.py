"""Tiny randomly initialised models (Llama-style causal, T5 seq2seq) with a character-level
tokenizer, saved to a temp dir once per session: real Hugging Face code paths, seconds on CPU."""

from __future__ import annotations

import ast
import csv
import dataclasses
import inspect
import json
import os
import string
import textwrap
from pathlib import Path

import pytest
import torch

from tether.config import TrainConfig
from tether.options import options

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPECIALS = ["<pad>", "</s>", "<s>", "<unk>"]
PROMPT_WORDS = [
    "hello there",
    "how are you",
    "tell me a story",
    "the cat sat",
    "good morning",
    "what is this",
    "once upon a time",
    "see you soon",
]
CHARS = list(string.ascii_lowercase + " .,!?")


def char_tokenizer():
    """One token per character: a toy reward on characters is then directly learnable."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )


def save_tiny_llama(path: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        initializer_range=0.3,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_t5(path: Path, seed: int = 0) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    tok = char_tokenizer()
    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
        initializer_factor=1.0,
    )
    model = T5ForConditionalGeneration(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_classifier(path: Path, labels: tuple[str, ...] = ("hate", "nothate")) -> Path:
    """A RoBERTa sequence classifier (the walkthrough's reward architecture), 64-token window."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    tok = char_tokenizer()
    tok.model_max_length = 64
    torch.manual_seed(0)
    cfg = RobertaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=66,  # RoBERTa counts positions from pad_token_id + 1
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        initializer_range=0.5,
    )
    RobertaForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_sft_adapter(model_dir: Path, path: Path, scale: float = 0.5) -> Path:
    """A non-trivial LoRA adapter on q/v (random B, so it really changes the model), as an SFT
    run would leave it: the starting point of `--adapter`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    seq2seq = AutoConfig.from_pretrained(model_dir).is_encoder_decoder
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    targets = ["q", "v"] if seq2seq else ["q_proj", "v_proj"]
    sft = get_peft_model(
        auto.from_pretrained(model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in sft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)
    sft.save_pretrained(path)
    return path


def _dialogue(i: int, chars: int) -> str:
    head = f"#Person1#: hello number {i}.\n#Person2#: "
    return head + "x" * (chars - len(head))


# DialogSum-shaped rows around the walkthrough's 200-1000 character filter
DIALOGSUM_ROWS = [
    {"id": f"train_{i}", "dialogue": _dialogue(i, n), "summary": f"person one greets {i}."}
    for i, n in enumerate([150, 200, 201, 500, 999, 1000, 1001, 1500] * 5)
]


@pytest.fixture
def dialogsum_csv(tmp_path) -> Path:
    """A DialogSum-layout train.csv (id, dialogue, summary, topic)."""
    path = tmp_path / "train.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "dialogue", "summary", "topic"])
        writer.writeheader()
        writer.writerows({**r, "topic": "greeting"} for r in DIALOGSUM_ROWS)
    return path


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    return save_tiny_classifier(tmp_path_factory.mktemp("tiny-classifier"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    return save_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(params=["llama", "t5"])
def tiny_model(request, tiny_llama, tiny_t5) -> Path:
    return {"llama": tiny_llama, "t5": tiny_t5}[request.param]


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": w}) + "\n" for w in PROMPT_WORDS))
    return path


def assert_close_nested(a, b, rel: float, abs: float, path: str = "row") -> None:
    """Equal structure (dict keys, list lengths, other values) with floats within rel/abs."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_close_nested(a[k], b[k], rel, abs, f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close_nested(x, y, rel, abs, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=rel, abs=abs), path
    else:
        assert a == b, path


def one_line_error(argv: list[str], capsys) -> str:
    """Run the CLI; it must exit 2 with exactly one `error: ` line and no traceback."""
    from tether.cli import main

    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def with_option(argv: list[str], flag: str, value: str) -> list[str]:
    """A copy of a command line with `flag`'s value replaced."""
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def tiny_run_config(model: Path, prompts: Path, out: Path, **kw) -> TrainConfig:
    """A quick PPO run on a tiny model: no progress bars, checkpoints or guard probes unless
    `kw` asks for them; `kw` (which names the reward) overrides any value."""
    values = dict(
        policy=str(model),
        prompts=f"jsonl:{prompts}",
        out=str(out),
        max_new_tokens=8,
        lora_r=4,
        progress=False,
        save_every=0,
        judge_every=0,
    )
    return TrainConfig.from_flat(**{**values, **kw})


@pytest.fixture
def scorers_file(tmp_path) -> Path:
    """Two toy text scores for detox-style runs: `vowels` (the reward), `spaces` (the judge)."""
    path = tmp_path / "scorers.py"
    path.write_text(
        "def vowels(p, c):\n"
        "    return [sum(ch in 'aeiou' for ch in x) / max(len(x), 1) for x in c]\n"
        "def spaces(p, c):\n"
        "    return [x.count(' ') / max(len(x), 1) for x in c]\n"
    )
    return path


@pytest.fixture
def reward_file(tmp_path) -> Path:
    """Toy reward: the fraction of 'a' characters in the completion."""
    path = tmp_path / "toy_reward.py"
    path.write_text(
        "def frac_a(prompts, completions):\n"
        "    return [c.count('a') / max(len(c), 1) for c in completions]\n"
        "def constant(prompts, completions):\n"
        "    return [0.0 for _ in completions]\n"
    )
    return path


@pytest.fixture
def vowel_reward(tmp_path) -> Path:
    """Toy rewards on the completion: the fraction of vowels, the same on a 0-0.05 scale, and
    a constant."""
    path = tmp_path / "vowel_reward.py"
    path.write_text(
        "def vowels(prompts, completions):\n"
        "    return [sum(ch in 'aeiou' for ch in c) / max(len(c), 1) for c in completions]\n"
        "def small(prompts, completions):\n"
        "    return [0.05 * sum(ch in 'aeiou' for ch in c) / max(len(c), 1) for c in completions]\n"
        "def constant(prompts, completions):\n"
        "    return [0.0 for _ in completions]\n"
    )
    return path


@pytest.fixture
def train_args(tiny_llama, prompts_file, reward_file, tmp_path):
    """A quick `tether train` command line on the tiny Llama (1 step, batch 2)."""
    return [
        "train",
        "--policy",
        str(tiny_llama),
        "--reward",
        f"python:{reward_file}:frac_a",
        "--prompts",
        f"jsonl:{prompts_file}",
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--mini-batch-size",
        "2",
        "--max-new-tokens",
        "4",
        "--no-progress",
    ]


SRC = Path(__file__).resolve().parents[1] / "src" / "tether"
# the config modules read every field (checks, YAML, config.yaml): no consumer
_CONFIG_MODULES = {"config.py", "options.py", "option_groups.py"}


def _attribute_reads(sources: list[Path]) -> set[tuple[str, str]]:
    """(holder, field) for every `holder.field` and `x.holder.field` in the sources."""
    reads = set()
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute):
                inner = node.value
                if isinstance(inner, ast.Attribute):
                    reads.add((inner.attr, node.attr))
                elif isinstance(inner, ast.Name):
                    reads.add((inner.id, node.attr))
    return reads


def _method_reads(klass: type, name: str) -> set[str]:
    """The fields a group's method or property reads as `self.<field>`."""
    member = inspect.getattr_static(klass, name)
    fn = member.fget if isinstance(member, property) else member
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    return {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"
    }


def unread_options(cls: type, extra_sources: tuple[Path, ...] = ()) -> list[str]:
    """The flags of command config `cls` that no consumer reads, by a look at the source: an
    option of a group is read where some module outside the config modules has
    `<holder>.<field>` (`cfg.rl.lr`, `rl.lr`), <holder> being a name under which any command
    holds that group (cai's KL group is `rl_kl`, the TrainConfig it builds reads it as `kl`), or
    calls a method of the group that reads the field (`cfg.model.load_safety()`); an option of
    the command's own as `cfg.<field>`. `extra_sources`: more modules to count as consumers."""
    from tether.config import COMMANDS

    sources = [p for p in SRC.rglob("*.py") if p.name not in _CONFIG_MODULES]
    reads = _attribute_reads([*sources, *extra_sources])
    holders: dict[type, set[str]] = {}
    for command in {*COMMANDS.values(), cls}:
        for f in dataclasses.fields(command):
            if "group" in f.metadata:
                holders.setdefault(f.metadata["group"], set()).add(f.name)
    unread = []
    for opt in options(cls):
        if len(opt.path) == 1:
            read = ("cfg", opt.spec.name) in reads
        else:
            names = holders[opt.owner]
            used = {attr for holder, attr in reads if holder in names}
            methods = [
                m for m in used if m in vars(opt.owner) and m not in opt.owner.__dataclass_fields__
            ]
            read = opt.spec.name in used or any(
                opt.spec.name in _method_reads(opt.owner, m) for m in methods
            )
        if not read:
            unread.append(opt.flag)
    return unread


def assert_every_option_read(command: str) -> None:
    """Each option of `command` has a consumer in tether's source (see `unread_options`)."""
    from tether.config import COMMANDS

    unread = unread_options(COMMANDS[command])
    assert not unread, f"tether {command}: nothing reads {', '.join(unread)}"


def resume_argv(model, prompts, reward, out, steps, **extra) -> list[str]:
    """`tether train` options (no command) for a short run that checkpoints, probes and adapts
    its KL coefficient: what a killed and resumed run must carry over; `extra` overrides."""
    args = {
        "policy": model,
        "reward": f"python:{reward}:frac_a",
        "prompts": f"jsonl:{prompts}",
        "out": out,
        "steps": steps,
        "batch-size": 4,
        "mini-batch-size": 2,
        "max-new-tokens": 8,
        "lr": 0.01,
        "lora-r": 4,
        "save-every": 2,
        "judge-every": 3,
        "probe-prompts": 2,
        "target-kl": 0.5,  # adaptive: the controller's state must survive the kill too
        **extra,
    }
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def undocumented(run_dir: Path) -> list[str]:
    """What a finished run wrote that the docs' reference does not list: metrics.jsonl keys
    missing from METRICS_FIELDS (nested guard keys as `guard.x`), and paths missing from
    RUN_LAYOUT (N standing for a step number; a listed directory's direct children must be listed
    too when any of them is)."""
    import re

    from tether.rundir import RUN_LAYOUT
    from tether.trainer import METRICS_FIELDS

    missing = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            keys = set(row)
            guard = row.get("guard", {})
            keys |= {f"guard.{k}" for k in guard}
            keys |= {f"guard.probe.{k}" for k in guard.get("probe", {})}
            missing += sorted(f"metrics.jsonl: {k}" for k in keys - METRICS_FIELDS.keys())

    def parent(p: str) -> str:
        p = p.rstrip("/")
        return p.rsplit("/", 1)[0] + "/" if "/" in p else ""

    patterns = [
        re.escape(p.replace("step-N", "step-@")).replace("@", r"\d+") for p, _, _ in RUN_LAYOUT
    ]
    # directories whose children are listed one by one, and every directory above a listed path
    itemised = {parent(p) for p in patterns} - {""}
    above = set()
    for p in patterns:
        while p := parent(p):
            above.add(p)

    def documented(rel: str) -> bool:
        if any(re.fullmatch(p, rel) for p in patterns + sorted(above)):
            return True
        up = parent(rel)
        if not up or any(re.fullmatch(p, up) for p in itemised):
            return False  # at the top, or its siblings are listed one by one and it is not
        return documented(up)

    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir).as_posix() + ("/" if path.is_dir() else "")
        if not documented(rel):
            missing.append(rel)
    return missing
