"""Each command shows and takes only the options it uses: the help lists its option groups, a
tiny run of the command runs and every option it accepts has a consumer in tether's source, and
an option of another command is refused in one line that names the commands that take it.
(`cai`'s options are checked by its end-to-end test in test_cai.py, which runs the whole
pipeline.)"""

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
from conftest import assert_every_option_read, unread_options

from tether.cli import build_parser, main
from tether.config import COMMANDS, DetoxConfig, EvalConfig, TrainConfig
from tether.option_groups import RLOptions
from tether.options import group, opt, options


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return capsys.readouterr().out


def test_eval_help_lists_only_what_eval_uses(capsys):
    text = _help(capsys, "eval")
    for flag in ("--trained", "--policy", "--lora-r", "--temperature", "--eval-prompts", "--out"):
        assert flag in text
    for flag in ("--lr", "--steps", "--advantage", "--kl-coef", "--judge-every", "--resume"):
        assert f"{flag} " not in text
    assert len(options(EvalConfig)) < len(options(DetoxConfig)) - 30
    for title in ("model and LoRA:", "sampling:", "evaluation on held-out prompts:"):
        assert title in text


def test_cai_help_shows_the_rl_options_in_one_group(capsys):
    text = _help(capsys, "cai", "run")
    start = text.index("RL-CAI (stage 5)")
    end = text.find("\n\n", start)
    rl = text[start : end if end > 0 else len(text)]
    body = text[text.index("\noptions:") :]  # past the usage line
    for flag in ("--rl-steps", "--rl-advantage", "--rl-kl-coef", "--rl-kl-estimator"):
        assert flag in rl and body.count(flag + " ") == 1
    assert "--rl-" not in body[: body.index("RL-CAI (stage 5)")]


def test_each_option_is_in_the_commands_that_take_it():
    train = {o.name for o in options(TrainConfig)}
    assert {o.name for o in options(EvalConfig)} - {"trained"} - {
        "eval_prompts",
        "eval_batch_size",
        "eval_seed",
        "eval_samples",
        "toxicity_threshold",
        "transfer_prompts",
        "transfer_eval_prompts",
        "similarity",
    } <= train
    for name, cls in COMMANDS.items():
        names = [o.name for o in options(cls)]
        assert len(names) == len(set(names)), name  # one flag per option


def _usage_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_an_option_of_another_command_is_refused_naming_it(capsys):
    assert _usage_error(["eval", "--out", "x", "--lr", "0.1"], capsys) == (
        "error: tether eval: --lr is not an option of eval "
        "(train, detox, hacking-demo, train-rm take it)"
    )
    assert _usage_error(["train", "--out", "x", "--rl-steps", "3"], capsys) == (
        "error: tether train: --rl-steps is not an option of train (cai take it)"
    )
    # an option no command takes still gets the closest match
    assert "(did you mean --eval-seed?)" in _usage_error(
        ["eval", "--out", "x", "--eval-sed", "3"], capsys
    )


def _scored(model, prompts, scorers):
    return [
        "--policy",
        str(model),
        "--reward",
        f"python:{scorers}:vowels",
        "--judge",
        f"python:{scorers}:spaces",
        "--prompts",
        f"jsonl:{prompts}",
        "--max-new-tokens",
        "4",
        "--lora-r",
        "2",
        "--no-progress",
    ]


@pytest.fixture
def inputs(tmp_path, scorers_file):
    prompts = tmp_path / "prompts.jsonl"
    words = ["hello there", "how are you", "a story", "the cat", "good day", "see you"] * 4
    prompts.write_text(
        "".join(json.dumps({"prompt": f"{w} {i}"}) + "\n" for i, w in enumerate(words))
    )
    return prompts, scorers_file


def test_train_reads_every_option(tiny_llama, inputs, tmp_path):
    prompts, scorers = inputs
    run = ["train", *_scored(tiny_llama, prompts, scorers), "--out", str(tmp_path / "run")]
    run += ["--steps", "1", "--batch-size", "4", "--judge-every", "1", "--probe-prompts", "2"]
    assert main(run) == 0  # gae: critic, GAE, KL in the reward
    grpo = ["--steps", "2", "--advantage", "grpo", "--group-size", "2", "--kl-estimator"]
    grpo += ["full"]
    assert main([*run[:-8], *grpo, "--resume", "--force"]) == 0
    assert_every_option_read("train")


def test_detox_and_eval_read_every_option(tiny_llama, inputs, tmp_path):
    prompts, scorers = inputs
    scored = _scored(tiny_llama, prompts, scorers) + ["--eval-prompts", "2", "--no-similarity"]

    def detox(out: str, *extra: str) -> list[str]:
        steps = ["--steps", "1", "--batch-size", "4", "--judge-every", "1", "--probe-prompts", "2"]
        return ["detox", *scored, "--out", str(tmp_path / out), *steps, *extra]

    assert main(detox("run")) == 0  # gae
    grpo = ["--advantage", "grpo", "--group-size", "2", "--kl-estimator", "full"]
    assert main(detox("grpo", *grpo)) == 0
    assert_every_option_read("detox")
    trained = ["--trained", str(tmp_path / "run" / "final")]
    assert main(["eval", *scored, "--out", str(tmp_path / "ev"), *trained]) == 0
    assert_every_option_read("eval")


def test_hacking_demo_reads_every_option(tiny_llama, inputs, tmp_path):
    prompts, scorers = inputs

    def demo(out: str, *extra: str) -> list[str]:
        steps = ["--steps", "1", "--batch-size", "4", "--judge-every", "1", "--probe-prompts", "2"]
        scored = _scored(tiny_llama, prompts, scorers)
        return ["hacking-demo", *scored, "--out", str(tmp_path / out), *steps, *extra]

    assert main(demo("gae")) == 0
    grpo = ["--advantage", "grpo", "--group-size", "2", "--kl-estimator", "full"]
    assert main(demo("grpo", *grpo)) == 0
    assert_every_option_read("hacking-demo")


def test_train_rm_reads_every_option(tiny_llama, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"q {i}", "chosen": "a good answer", "rejected": "bad"} for i in range(6)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["train-rm", "--pairs", str(pairs), "--out", str(tmp_path / "pm"), "--base"]
    argv += [str(tiny_llama), "--epochs", "1", "--no-progress"]
    assert main(argv) == 0
    assert_every_option_read("train-rm")


def test_every_option_of_every_command_has_a_consumer():
    for name, cls in COMMANDS.items():
        assert unread_options(cls) == [], name


@dataclass
class _Unread:
    title: ClassVar[str] = "nobody's"

    nobody_reads_this: int = opt(1, "an option no module reads")
    temperature: float = opt(1.0, "a name that modules read, but never through this group")


@dataclass
class _FakeCommand:
    title: ClassVar[str] = "fake"

    rl: RLOptions = group(RLOptions)
    unread: _Unread = group(_Unread)
    nor_this: int = opt(0, "an own option no module reads")


def test_unread_options_reports_a_field_nobody_reads(tmp_path):
    """The negative control: the check can fail, per field, through the group's holder name."""
    assert unread_options(_FakeCommand) == ["--nobody-reads-this", "--temperature", "--nor-this"]
    # a consumer that reads two of them through the group's holder name (or `cfg`) reads them
    consumer = tmp_path / "consumer.py"
    consumer.write_text("def f(cfg):\n    return cfg.unread.nobody_reads_this, cfg.nor_this\n")
    assert unread_options(_FakeCommand, (consumer,)) == ["--temperature"]
