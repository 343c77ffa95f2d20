"""Preference models from pairs: the soft Bradley-Terry loss, training on a separable toy set,
`pm:DIR` as a reward, and one-line errors for bad pairs files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tether import ppo
from tether.cli import main
from tether.config import RewardModelConfig
from tether.errors import TetherError
from tether.rewards import load_reward
from tether.train_rm import read_pairs, train_reward_model


def test_preference_loss_by_hand():
    # margin 0: -log sigma(0) = log 2 whatever the label
    zero = torch.zeros(3)
    assert ppo.preference_loss(zero, zero, torch.tensor([1.0, 0.5, 0.0])).item() == pytest.approx(
        math.log(2)
    )
    # margin 2, label 0.75: -(0.75 log sigma(2) + 0.25 log sigma(-2))
    expected = -(0.75 * math.log(1 / (1 + math.exp(-2))) + 0.25 * math.log(1 / (1 + math.exp(2))))
    got = ppo.preference_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([0.75]))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # label 1 is the hard loss; swapping chosen/rejected equals flipping the label
    a, b = torch.tensor([0.3, -1.2]), torch.tensor([1.1, 0.4])
    lab = torch.tensor([0.9, 0.2])
    assert ppo.preference_loss(a, b, lab).item() == pytest.approx(
        ppo.preference_loss(b, a, 1 - lab).item(), rel=1e-6
    )


def _toy_pairs(path, n=32):
    words = ["cat", "dog", "sun", "tree", "fish", "moon", "rain", "book"]
    rows = [
        {
            "prompt": f"say something {words[i % 8]} {i}",
            "chosen": f"good good {words[i % 8]}",
            "rejected": f"bad bad {words[(i + 3) % 8]}",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reward_model_learns_separable_pairs(tiny_llama, tmp_path):
    pairs = _toy_pairs(tmp_path / "pairs.jsonl")
    cfg = RewardModelConfig(
        pairs=str(pairs),
        out=str(tmp_path / "pm"),
        base=str(tiny_llama),
        epochs=3,
        lr=3e-3,
        heldout_fraction=0.25,
        device="cpu",
        progress=False,
    )
    result = train_reward_model(cfg)
    assert result.n_heldout > 0
    assert result.heldout_accuracy is not None and result.heldout_accuracy > 0.8
    assert result.losses[-1] < result.losses[0]

    reward = load_reward(f"pm:{tmp_path / 'pm'}")
    prompts = [f"say something {w} 99" for w in ("cat", "moon")]
    good = reward.score(prompts, ["good good cat", "good good moon"])
    bad = reward.score(prompts, ["bad bad cat", "bad bad moon"])
    assert all(g > b for g, b in zip(good, bad, strict=True))


def test_read_pairs_errors(tmp_path):
    with pytest.raises(TetherError, match="pairs file not found"):
        read_pairs(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 1}\n'
    )
    with pytest.raises(TetherError, match=r"bad.jsonl:2: expected a string \"chosen\""):
        read_pairs(str(bad))
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c", "label": 1.5}\n')
    with pytest.raises(TetherError, match=r":1: \"label\" must be a number in \[0, 1\]"):
        read_pairs(str(bad))
    soft = tmp_path / "soft.jsonl"
    soft.write_text('{"prompt": "a", "chosen": "b", "rejected": "c", "label": 0.7}\n')
    assert read_pairs(str(soft))[0].label == pytest.approx(0.7)


def test_cli_train_rm_bad_input_is_one_line(tmp_path, capsys):
    assert (
        main(["train-rm", "--pairs", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pairs file not found" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\nnot json\n')
    assert main(["train-rm", "--pairs", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.jsonl:2: malformed JSON" in err


def test_pm_spec_without_model_dir(tmp_path):
    with pytest.raises(TetherError, match="tether_pm.json"):
        load_reward(f"pm:{tmp_path}")
