"""DialogSum-style prompts from local files, the walkthrough's length filter, and ROUGE."""

import json
import sys
import types

import pytest
from conftest import DIALOGSUM_ROWS as ROWS

from tether.cli import main
from tether.data import SUMMARIZE_TEMPLATE, load_prompts
from tether.errors import TetherError
from tether.evaluate import rouge_f1


def test_csv_jsonl_and_directory_give_the_same_records(dialogsum_csv, tmp_path):
    jsonl = tmp_path / "copy" / "dialogsum.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    from_csv = load_prompts(f"dialogsum:{dialogsum_csv}")
    assert (
        from_csv == load_prompts(f"dialogsum:{jsonl}") == load_prompts(f"dialogsum:{jsonl.parent}")
    )
    (tmp_path / "test.csv").write_text("id,dialogue,summary\ntest_0,#Person1#: bye.,a goodbye.\n")
    assert load_prompts(f"dialogsum:{tmp_path}") == from_csv  # the dir's train file(s) only
    assert len(from_csv) == 8 * 5
    r = from_csv[0]
    assert r.prompt == SUMMARIZE_TEMPLATE.replace("{dialogue}", r.source)
    assert r.reference == next(x["summary"] for x in ROWS if x["dialogue"] == r.source)


def test_length_filter_keeps_200_to_1000_characters(dialogsum_csv):
    kept = load_prompts(f"dialogsum:{dialogsum_csv}@200-1000")
    # the walkthrough's filter: 200 < len(dialogue) <= 1000
    assert sorted({len(r.source) for r in kept}) == [201, 500, 999, 1000]


def test_splits_are_disjoint_stable_and_complete(dialogsum_csv):
    spec = f"dialogsum:{dialogsum_csv}"
    train = load_prompts(spec, "train", 0.25)
    heldout = load_prompts(spec, "heldout", 0.25)
    assert train and heldout and not {r.prompt for r in train} & {r.prompt for r in heldout}
    assert len(train) + len(heldout) == len(load_prompts(spec))
    assert load_prompts(spec, "heldout", 0.25) == heldout


@pytest.mark.parametrize(
    "spec, message",
    [
        ("dialogsum:/no/such/file.csv", "dialogsum path not found: /no/such/file.csv"),
        ("dialogsum@1000-200", "MIN must be below MAX"),
        ("dialogsumx", "unknown prompt spec 'dialogsumx'"),
        ("dialogsum@abc", "expected dialogsum[:PATH][@MIN-MAX]"),
    ],
)
def test_spec_mistakes(spec, message):
    with pytest.raises(TetherError) as e:
        load_prompts(spec)
    assert message in str(e.value)


def test_file_mistakes_name_the_file(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,summary\nhello,hi\n")
    with pytest.raises(
        TetherError, match=r"bad.csv: no 'dialogue' column \(columns: text, summary\)"
    ):
        load_prompts(f"dialogsum:{bad}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"dialogue": "a"}\n{"dialogue": 3}\n')
    with pytest.raises(TetherError, match=r"bad.jsonl:2: expected an object"):
        load_prompts(f"dialogsum:{bad}")
    short = tmp_path / "short.jsonl"
    short.write_text('{"dialogue": "a", "summary": "b"}\n')
    with pytest.raises(TetherError, match="holds no all dialogues of 200 < characters <= 300"):
        load_prompts(f"dialogsum:{short}@200-300")


def test_hub_without_network_says_how_to_give_a_local_copy():
    with pytest.raises(TetherError) as e:
        load_prompts("dialogsum")
    assert "dialogsum:" in str(e.value) and "knkarthick/dialogsum" in str(e.value)


def test_rouge_f1_by_hand():
    same, none, half = rouge_f1(
        ["the cat sat", "dogs bark", "the cat ran"], ["the cat sat", "the cat sat", "the cat sat"]
    )
    assert same == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert none == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    # 2 of 3 unigrams shared both ways: P = R = F1 = 2/3; bigrams: "the cat" only, 1 of 2
    assert half == pytest.approx({"rouge1": 2 / 3, "rouge2": 0.5, "rougeL": 2 / 3})


def test_seq2seq_detox_and_eval_report_rouge_against_the_references(
    tiny_t5, dialogsum_csv, scorers_file, tmp_path, capsys
):
    """T5 end to end through the CLI on DialogSum-style data: ROUGE-1/2/L before vs after."""
    scorers = scorers_file
    common = ["--policy", str(tiny_t5), "--prompts", f"dialogsum:{dialogsum_csv}@200-1000"]
    common += ["--reward", f"python:{scorers}:vowels", "--judge", f"python:{scorers}:spaces"]
    common += ["--max-new-tokens", "8", "--max-prompt-tokens", "48", "--eval-prompts", "6"]
    common += ["--eval-batch-size", "3", "--eval-samples", "1", "--no-similarity", "--no-progress"]
    run = tmp_path / "run"
    argv = ["detox", *common, "--out", str(run), "--steps", "2", "--batch-size", "4"]
    assert main([*argv, "--mini-batch-size", "2", "--judge-every", "0"]) == 0
    stdout = capsys.readouterr().out
    assert "rouge1" in stdout and "rougeL" in stdout
    report = json.loads((run / "report.json").read_text())
    for key in ("rouge1", "rouge2", "rougeL"):
        assert report["quality"][key]["n"] == 6
        assert 0.0 <= report["quality"][key]["before_mean"] <= 1.0
    rows = [json.loads(x) for x in (run / "eval" / "aligned.jsonl").read_text().splitlines()]
    assert all(r["reference"].startswith("person one greets") for r in rows)
    assert (
        rows[0]["rouge1"] == rouge_f1([rows[0]["completion"]], [rows[0]["reference"]])[0]["rouge1"]
    )

    # eval of the trained adapter on the same prompts reproduces detox's aligned rows
    again = tmp_path / "eval"
    assert main(["eval", *common, "--out", str(again), "--trained", str(run / "final")]) == 0
    redone = [json.loads(x) for x in (again / "eval" / "aligned.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in redone] == [r["completion"] for r in rows]
    assert json.loads((again / "report.json").read_text())["quality"]["rougeL"]["n"] == 6


def test_hub_dialogsum_reads_the_train_split_through_datasets(monkeypatch):
    """The network path, with `datasets.load_dataset` stood in for (no hub here)."""
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return ROWS

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    records = load_prompts("dialogsum@200-1000")
    assert calls == [("knkarthick/dialogsum", "train")]
    assert sorted({len(r.source) for r in records}) == [201, 500, 999, 1000]
    assert all(r.reference.startswith("person one greets") for r in records)
