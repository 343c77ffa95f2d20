"""`hf:` rewards and judges on a tiny randomly initialised RoBERTa classifier saved to a temp dir."""

import pytest
import torch
from conftest import save_tiny_classifier
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tether.cli import main
from tether.errors import TetherError
from tether.rewards import checked_scores, load_reward
from tether.rewards.hf import parse_hf_spec

TEXTS = ["hello there", "you are a bad cat", "x", "good morning, how are you today?"]


@pytest.mark.parametrize(
    "rest, expected",
    [
        (
            "facebook/roberta-hate-speech-dynabench-r4-target:nothate@logit",
            ("facebook/roberta-hate-speech-dynabench-r4-target", "nothate", "logit"),
        ),
        ("org/model", ("org/model", None, "prob")),
        ("/tmp/clf:LABEL_1", ("/tmp/clf", "LABEL_1", "prob")),
        ("/tmp/a@b/clf@prob", ("/tmp/a@b/clf", None, "prob")),
    ],
)
def test_spec_parsing(rest, expected):
    assert parse_hf_spec(rest) == expected


def test_spec_with_unknown_mode_is_refused():
    with pytest.raises(TetherError, match="mode 'sigmoid' unknown"):
        parse_hf_spec("org/model:nothate@sigmoid")


def _reference_logits(path, texts):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return torch.cat([model(**tok([t], return_tensors="pt")).logits for t in texts])


def test_label_is_chosen_by_name_and_modes_match_the_model(tiny_classifier):
    logits = _reference_logits(tiny_classifier, TEXTS)  # id2label = {0: hate, 1: nothate}
    as_logit = load_reward(f"hf:{tiny_classifier}:nothate@logit")
    as_prob = load_reward(f"hf:{tiny_classifier}:nothate")
    hate = load_reward(f"hf:{tiny_classifier}:hate@prob")
    assert as_logit.name.endswith(":nothate@logit")
    assert checked_scores(as_logit, TEXTS, TEXTS) == pytest.approx(logits[:, 1].tolist(), abs=1e-5)
    probs = torch.softmax(logits, -1)
    assert as_prob.score(TEXTS, TEXTS) == pytest.approx(probs[:, 1].tolist(), abs=1e-5)
    assert hate.score(TEXTS, TEXTS) == pytest.approx(probs[:, 0].tolist(), abs=1e-5)
    assert (logits[:, 0] - logits[:, 1]).abs().max() > 1e-3  # the two labels really differ


def test_batched_scores_equal_one_at_a_time(tiny_classifier):
    reward = load_reward(f"hf:{tiny_classifier}:nothate@logit")
    reward.batch_size = 3  # batches of unequal lengths, so padding is in play
    single = _reference_logits(tiny_classifier, TEXTS)[:, 1].tolist()
    assert reward.score(TEXTS, TEXTS) == pytest.approx(single, abs=1e-5)
    assert reward.score([], []) == []


def test_over_long_texts_are_truncated_and_counted(tiny_classifier, capsys):
    reward = load_reward(f"hf:{tiny_classifier}:nothate")
    long_texts = ["a" * 200, "short", "b" * 65]
    scores = reward.score(long_texts, long_texts)
    assert len(scores) == 3 and all(0 < s < 1 for s in scores)
    assert reward.max_tokens == 64 and reward.truncated == 2
    assert "2 of 3 texts longer than 64 tokens were truncated" in capsys.readouterr().err


def test_label_mistakes_name_the_labels(tiny_classifier):
    with pytest.raises(
        TetherError, match=r"no label 'toxic'; its labels are \['hate', 'nothate'\]"
    ):
        load_reward(f"hf:{tiny_classifier}:toxic")
    with pytest.raises(TetherError, match="choose one by name"):
        load_reward(f"hf:{tiny_classifier}")


def test_offline_hub_id_fails_in_one_line_naming_the_model(
    tiny_llama, prompts_file, tmp_path, capsys
):
    spec = "hf:facebook/roberta-hate-speech-dynabench-r4-target:nothate@logit"
    argv = ["train", "--policy", str(tiny_llama), "--reward", spec]
    argv += ["--prompts", f"jsonl:{prompts_file}", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot load reward model"), err
    assert "facebook/roberta-hate-speech-dynabench-r4-target" in err[0]
    assert "--local-dir DIR" in err[0] and "pass DIR instead" in err[0]
    assert not (tmp_path / "run").exists()  # nothing spent, nothing written
    assert main([*argv[:3], "--reward", "hf:./no/such/dir:nothate", *argv[5:]]) == 2
    assert "reward model path does not exist: ./no/such/dir" in capsys.readouterr().err


def test_single_output_head_needs_no_label_and_uses_sigmoid(tmp_path):
    path = save_tiny_classifier(tmp_path / "scorer", labels=("score",))
    logits = _reference_logits(path, TEXTS)[:, 0]
    assert load_reward(f"hf:{path}").score(TEXTS, TEXTS) == pytest.approx(
        torch.sigmoid(logits).tolist(), abs=1e-5
    )
    assert load_reward(f"hf:{path}@logit").score(TEXTS, TEXTS) == pytest.approx(
        logits.tolist(), abs=1e-5
    )
