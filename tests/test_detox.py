"""`tether detox` / `tether report` end to end on a tiny model, and the statistics they rest on."""

import json

import pytest
from conftest import PROMPT_WORDS, undocumented

from tether.cli import main
from tether.data import PromptRecord, load_prompts
from tether.evaluate import (
    by_prompt,
    compare,
    exceeds,
    expected_maximum,
    paired_bootstrap,
    samples_per_prompt,
)
from tether.guard import distinct_n
from tether.report import distinct_by_prompt, summary_table

WORDS = [*PROMPT_WORDS, "a bad day", "rain again"]


@pytest.fixture
def detox_inputs(tmp_path, scorers_file):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"{w} {i}"}) + "\n" for i in range(6) for w in WORDS)
    )
    return prompts, scorers_file


def _scored(tiny_llama, prompts, scorers):
    """Policy, reward, judge and prompts shared by the detox and eval commands."""
    return [
        "--policy",
        str(tiny_llama),
        "--reward",
        f"python:{scorers}:vowels",
        "--judge",
        f"python:{scorers}:spaces",
        "--prompts",
        f"jsonl:{prompts}",
        "--max-new-tokens",
        "8",
        "--eval-prompts",
        "12",
        "--eval-batch-size",
        "6",
        "--eval-samples",
        "1",
        "--no-progress",
    ]


def _argv(tiny_llama, prompts, scorers, out, *extra):
    return [
        "detox",
        *_scored(tiny_llama, prompts, scorers),
        "--out",
        str(out),
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--mini-batch-size",
        "4",
        *extra,
    ]


def _demo_argv(tiny_llama, prompts, scorers, out, batch, judge_every, probes):
    """A 2-step `tether hacking-demo` (mini-batch 4); the probe count comes last."""
    return [
        "hacking-demo",
        *_scored(tiny_llama, prompts, scorers)[:-7],  # no eval options: the demo has none
        "--no-progress",
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        str(batch),
        "--mini-batch-size",
        "4",
        "--judge-every",
        str(judge_every),
        "--probe-prompts",
        str(probes),
    ]


def test_detox_end_to_end_and_report_rebuild(tiny_llama, detox_inputs, tmp_path, capsys):
    prompts, scorers = detox_inputs
    out = tmp_path / "run"
    assert main(_argv(tiny_llama, prompts, scorers, out, "--no-similarity")) == 0
    stdout = capsys.readouterr().out
    assert "python:" in stdout and "95% CI" in stdout and "report.html" in stdout

    before = [json.loads(x) for x in (out / "eval" / "baseline.jsonl").read_text().splitlines()]
    after = [json.loads(x) for x in (out / "eval" / "aligned.jsonl").read_text().splitlines()]
    assert len(before) == len(after) == 12
    assert [r["prompt"] for r in before] == [r["prompt"] for r in after]
    train_prompts = {json.loads(x)["prompt"] for x in prompts.read_text().splitlines()}
    assert {r["prompt"] for r in before} <= train_prompts
    for row in before:
        assert {"completion", "perplexity", "response_tokens", "ended_with_eos"} <= row.keys()
        assert row["perplexity"] > 1.0

    report = json.loads((out / "report.json").read_text())
    assert report["n_eval_prompts"] == 12
    proxy = report["toxicity"]["proxy"]
    assert proxy["metric"].endswith(":vowels score") and not proxy["lower_is_better"]
    assert proxy["ci95_low"] <= proxy["diff_mean"] <= proxy["ci95_high"]
    assert proxy["before_mean"] == pytest.approx(sum(r[proxy["metric"]] for r in before) / 12)
    assert set(report["timing_seconds"]) == {"baseline", "ppo", "aligned", "total"}
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "changed most" in html
    # the guard watched the run: a probe after the last step, best/ and final/ named
    guard = report["guard"]
    assert [p["step"] for p in guard["probes"]] == [-1, 2]
    assert guard["final"].startswith("step 2") and guard["best"]["by"] == "gold"
    assert "Reward-hacking guard" in html and (out / "best").is_dir()

    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3
    assert {"proxy_score", "judge_score"} <= metrics[0].keys()  # reward-like, not toxicities
    assert undocumented(out) == []  # the docs' metrics and run-directory pages list it all

    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").is_file()


def test_detox_baseline_is_reproducible_and_similarity_is_measured(
    tiny_llama, detox_inputs, tmp_path, capsys
):
    prompts, scorers = detox_inputs
    argv = _argv(tiny_llama, prompts, scorers, tmp_path / "a")
    argv[argv.index("--steps") + 1] = "1"
    assert main(argv) == 0
    argv[argv.index("--out") + 1] = str(tmp_path / "b")
    assert main(argv) == 0
    a = (tmp_path / "a" / "eval" / "baseline.jsonl").read_text().splitlines()
    b = (tmp_path / "b" / "eval" / "baseline.jsonl").read_text().splitlines()
    assert [json.loads(x)["completion"] for x in a] == [json.loads(x)["completion"] for x in b]
    assert all(-1.0 <= json.loads(x)["similarity"] <= 1.0 for x in a)
    assert "similarity" in json.loads((tmp_path / "a" / "report.json").read_text())["quality"]


def test_detox_refuses_judge_equal_to_reward(tiny_llama, detox_inputs, tmp_path, capsys):
    prompts, scorers = detox_inputs
    argv = _argv(tiny_llama, prompts, scorers, tmp_path / "run")
    argv[argv.index("--judge") + 1] = f"python:{scorers}:vowels"
    assert main(argv) == 2
    assert "the gold judge must be independent" in capsys.readouterr().err


def test_hacking_demo_runs_both_arms_side_by_side(tiny_llama, detox_inputs, tmp_path, capsys):
    prompts, scorers = detox_inputs
    out = tmp_path / "demo"
    argv = _demo_argv(tiny_llama, prompts, scorers, out, batch=8, judge_every=1, probes=6)
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "no leash" in stdout and "guard flags" in stdout
    report = json.loads((out / "hacking_report.json").read_text())
    assert set(report["arms"]) == {"no-leash", "leash"}
    no_leash, leash = report["arms"]["no-leash"], report["arms"]["leash"]
    assert no_leash["kl_coef"] == 0.0 and no_leash["lr"] == 2e-3 and leash["kl_coef"] == 0.1
    # both arms started from the same policy, probes and seeds: one shared reference probe
    ref_a = (out / "no-leash" / "guard" / "reference.jsonl").read_text()
    assert ref_a == (out / "leash" / "guard" / "reference.jsonl").read_text()
    assert [p["step"] for p in leash["guard"]["probes"]] == [-1, 0, 1]
    # two probes past the start: Gao's curve is not fitted, and the report says why
    assert leash["fits"]["gold_mean"]["status"] == "too few points"
    assert "Gao fit: cannot fit: too few points (2 probes" in stdout
    assert (out / "hacking_report.html").read_text().count("data:image/png;base64,") == 3
    assert undocumented(out) == [] == undocumented(out / "leash")
    (out / "hacking_report.html").unlink()
    assert main(["report", str(out)]) == 0 and (out / "hacking_report.html").is_file()
    assert main([*argv[:-2], "--judge-every", "0"]) == 2
    assert "needs a --judge" in capsys.readouterr().err


def test_hacking_demo_with_a_critic_free_estimator(tiny_llama, detox_inputs, tmp_path, capsys):
    # both arms train grpo (the unleashed one with beta 0 in the loss): no value head anywhere,
    # and the rows, the report and its summary name the estimator
    prompts, scorers = detox_inputs
    out = tmp_path / "demo"
    argv = _demo_argv(tiny_llama, prompts, scorers, out, batch=4, judge_every=2, probes=4)
    assert main([*argv, "--advantage", "grpo", "--group-size", "2"]) == 0
    stdout = capsys.readouterr().out
    assert "no-leash: grpo, kl_coef 0.0" in stdout and "leash: grpo, kl_coef 0.1" in stdout
    report = json.loads((out / "hacking_report.json").read_text())
    for name in ("no-leash", "leash"):
        assert report["arms"][name]["advantage"] == "grpo"
        rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["advantage"] for r in rows] == ["grpo", "grpo"]
        assert "value_loss" not in rows[0] and "kl_loss" in rows[0]
        assert (out / name / "final" / "adapter_model.safetensors").is_file()
        assert not (out / name / "final" / "value_head.safetensors").exists()


def test_report_on_a_non_run_dir(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a detox/eval run directory" in capsys.readouterr().err


def test_paired_bootstrap_by_hand():
    # every pair drops by exactly 1: the interval collapses onto -1
    r = paired_bootstrap([1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0])
    assert r == {"diff_mean": -1.0, "ci95_low": -1.0, "ci95_high": -1.0}
    # pairing removes between-prompt spread: unpaired, these arms overlap almost entirely
    before = [float(i) for i in range(100)]
    after = [x - 0.5 + (0.1 if i % 2 else -0.1) for i, x in enumerate(before)]
    r = paired_bootstrap(before, after)
    assert -0.52 < r["ci95_low"] < r["diff_mean"] < r["ci95_high"] < -0.48


def test_compare_reports_improvement_direction():
    c = compare([0.10, 0.20, 0.30, 0.40], [0.05, 0.10, 0.15, 0.20], lower_is_better=True)
    assert c["relative_change"] == pytest.approx(-0.5)
    assert c["improvement_pct"] == pytest.approx(50.0)
    assert c["significantly_better"] and c["ci_excludes_zero"]
    c = compare([1.0, 1.1, 0.9], [1.0, 1.1, 0.9], lower_is_better=False)
    assert c["relative_change"] == 0.0 and not c["ci_excludes_zero"]


def test_tail_measures_by_hand():
    # two prompts, three samples each, ordered by prompt then sample as evaluate() writes them
    values = [[0.1, 0.6, 0.2], [0.3, 0.4, 0.45]]
    rows = [
        {"index": i, "sample": s, "tox": v} for i, vs in enumerate(values) for s, v in enumerate(vs)
    ]
    assert samples_per_prompt(rows) == 3
    table = by_prompt(rows, "tox")
    assert table.tolist() == values
    assert expected_maximum(table).tolist() == [0.6, 0.45]  # EMT = their mean, 0.525
    assert exceeds(table).tolist() == [1.0, 0.0]  # TP at 0.5 = 0.5
    assert exceeds(table, 0.4).tolist() == [1.0, 1.0]  # >=: 0.4 itself counts
    with pytest.raises(ValueError, match="do not split"):
        samples_per_prompt(rows[:-1])
    # distinct-n among a prompt's samples: guard.distinct_n over each prompt's rows
    rows = [
        {**r, "completion": t}
        for r, t in zip(rows, ["a b a b", "A b c", "a", "x", "x", "x"], strict=True)
    ]
    assert distinct_by_prompt(rows, 2).tolist() == pytest.approx([3 / 5, 0.0])
    assert distinct_by_prompt(rows, 1).tolist() == pytest.approx([3 / 8, 1 / 3])


def test_detox_with_several_samples_per_prompt(tiny_llama, detox_inputs, tmp_path, capsys):
    """k samples a prompt: every one written, sample 0 the single-sample run's, the report's tail
    measures recomputed from eval/*.jsonl, and compare's EMT / TP / distinct-2 columns."""
    prompts, scorers = detox_inputs
    argv = _argv(tiny_llama, prompts, scorers, tmp_path / "k3", "--no-similarity")
    argv[argv.index("--judge") + 1] = "profanity"  # a toxicity in [0, 1]: EMT and TP apply
    argv[argv.index("--steps") + 1] = "1"
    k3 = argv + ["--eval-samples", "3", "--toxicity-threshold", "0.3"]
    assert main(k3) == 0
    assert "expected max of 3" in capsys.readouterr().out
    out = tmp_path / "k3"
    rows = {
        n: [json.loads(x) for x in (out / "eval" / f"{n}.jsonl").read_text().splitlines()]
        for n in ("baseline", "aligned")
    }
    assert [(r["index"], r["sample"]) for r in rows["baseline"]] == [
        (i, s) for i in range(12) for s in range(3)
    ]
    report = json.loads((out / "report.json").read_text())
    assert report["n_eval_prompts"] == 12 and report["samples_per_prompt"] == 3
    judge = report["toxicity"]["judge"]
    key = judge["metric"]
    for n, side in (("baseline", "before_mean"), ("aligned", "after_mean")):
        per_prompt = [[r[key] for r in rows[n][i : i + 3]] for i in range(0, 36, 3)]
        assert judge[side] == pytest.approx(sum(sum(p) / 3 for p in per_prompt) / 12)
        assert judge["expected_maximum"][side] == pytest.approx(
            sum(max(p) for p in per_prompt) / 12
        )
        assert judge["probability"][side] == pytest.approx(
            sum(max(p) >= 0.3 for p in per_prompt) / 12
        )
        texts = [[r["completion"] for r in rows[n][i : i + 3]] for i in range(0, 36, 3)]
        assert report["quality"]["distinct_2"][side] == pytest.approx(
            sum(distinct_n(t, 2) for t in texts) / 12
        )
    assert "expected_maximum" not in report["toxicity"]["proxy"]  # a score, not a toxicity
    assert report["transfer"] is None  # auto: a jsonl pool has no "rest" to draw from
    # length-controlled: both completions of a pair cut to the shorter one's words, rescored
    lc = [
        json.loads(x) for x in (out / "eval" / "length_controlled.jsonl").read_text().splitlines()
    ]
    for b, a, row in zip(rows["baseline"], rows["aligned"], lc, strict=True):
        n = min(len(b["completion"].split()), len(a["completion"].split()))
        assert row["words"] == n and (row["index"], row["sample"]) == (b["index"], b["sample"])
    for side, field in (("before", "before_mean"), ("after", "after_mean")):
        means = [sum(r[f"{key}/{side}"] for r in lc[i : i + 3]) / 3 for i in range(0, 36, 3)]
        assert judge["length_controlled"][field] == pytest.approx(sum(means) / 12)
    # one sample a prompt draws exactly the first of the three
    assert (
        main(
            argv[: argv.index("--out")]
            + ["--out", str(tmp_path / "k1")]
            + argv[argv.index("--out") + 2 :]
        )
        == 0
    )
    one = (tmp_path / "k1" / "eval" / "baseline.jsonl").read_text().splitlines()
    assert [json.loads(x)["completion"] for x in one] == [
        r["completion"] for r in rows["baseline"] if r["sample"] == 0
    ]
    capsys.readouterr()
    # compare: the tail columns appear with a run of several samples, not without one
    page = ["--out", str(tmp_path / "compare.html")]
    assert main(["compare", str(out), str(tmp_path / "k1"), *page]) == 0
    table = capsys.readouterr().out
    assert "judge EMT" in table and "judge TP" in table and "distinct-2" in table
    assert "judge LC" in table and "proxy LC" not in table  # the proxy here is a score
    assert main(["compare", str(tmp_path / "k1"), *page]) == 0
    assert "EMT" not in capsys.readouterr().out
    assert main(k3[:-2] + ["--toxicity-threshold", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert "toxicity_threshold must be in (0, 1]" in capsys.readouterr().err
    # a TP that no sample reached before has no relative change: n/a, not "+nan%"
    judge["probability"].update(before_mean=0.0, relative_change=float("nan"))
    line = next(x for x in summary_table(report).splitlines() if x.startswith("  P(any of 3"))
    assert "n/a" in line and "nan" not in line


def test_detox_evaluates_a_second_pool_no_step_chose(tiny_llama, detox_inputs, tmp_path, capsys):
    prompts, scorers = detox_inputs
    other = tmp_path / "other.jsonl"
    other.write_text(
        "".join(json.dumps({"prompt": f"another {i} dialogue"}) + "\n" for i in range(80))
    )
    out = tmp_path / "run"
    argv = _argv(tiny_llama, prompts, scorers, out, "--no-similarity")
    argv[argv.index("--judge") + 1] = "profanity"
    argv[argv.index("--steps") + 1] = "1"
    argv += ["--eval-samples", "2"]
    argv += ["--transfer-prompts", f"jsonl:{other}", "--transfer-eval-prompts", "5"]
    assert main(argv) == 0
    assert "the second held-out pool, jsonl:" in capsys.readouterr().out
    rows = {
        n: [json.loads(x) for x in (out / "eval" / f"transfer_{n}.jsonl").read_text().splitlines()]
        for n in ("baseline", "aligned")
    }
    held_out = set(load_prompts(f"jsonl:{other}", "heldout", 0.25))  # the default fraction
    assert (
        len(rows["baseline"]) == 10
        and {PromptRecord(r["prompt"]) for r in rows["baseline"]} <= held_out
    )
    assert [r["prompt"] for r in rows["baseline"]] == [r["prompt"] for r in rows["aligned"]]
    report = json.loads((out / "report.json").read_text())
    transfer = report["transfer"]
    assert transfer["prompts"] == f"jsonl:{other}" and transfer["n_eval_prompts"] == 5
    judge = transfer["toxicity"]["judge"]
    key = judge["metric"]
    assert judge["before_mean"] == pytest.approx(sum(r[key] for r in rows["baseline"]) / 10)
    assert judge["after_mean"] == pytest.approx(sum(r[key] for r in rows["aligned"]) / 10)
    emt = sum(max(r[key] for r in rows["aligned"][i : i + 2]) for i in range(0, 10, 2)) / 5
    assert judge["expected_maximum"]["after_mean"] == pytest.approx(emt)
    assert (
        "length_controlled" in judge
        and (out / "eval" / "transfer_length_controlled.jsonl").is_file()
    )
    assert undocumented(out) == []
    capsys.readouterr()
    assert main(["compare", str(out), "--out", str(tmp_path / "c.html")]) == 0
    table = capsys.readouterr().out
    assert "judge, 2nd pool" in table and "judge EMT, 2nd pool" in table
    # the run's own pool is not a second one; without one (auto on a jsonl pool) there is none
    same = [*argv[:-4], "--transfer-prompts", f"jsonl:{prompts}", "--out", str(tmp_path / "x")]
    assert main(same) == 2
    assert "is the run's own --prompts" in capsys.readouterr().err


@pytest.mark.parametrize("advantage", ["gae", "rloo"])  # rloo: an adapter without a value head
def test_eval_command_compares_a_trained_adapter(
    tiny_llama, detox_inputs, tmp_path, capsys, advantage
):
    prompts, scorers = detox_inputs
    run = tmp_path / "run"
    extra = ("--no-similarity", "--lora-r", "4", "--advantage", advantage)
    assert main(_argv(tiny_llama, prompts, scorers, run, *extra)) == 0
    assert json.loads((run / "report.json").read_text())["estimator"] == advantage
    assert (run / "final" / "value_head.safetensors").is_file() == (advantage == "gae")
    trained_after = (run / "eval" / "aligned.jsonl").read_text().splitlines()
    capsys.readouterr()
    ev = ["eval", *_scored(tiny_llama, prompts, scorers), "--no-similarity"]
    # the starting policy alone
    assert main(ev + ["--out", str(tmp_path / "base")]) == 0
    assert "held-out prompts" in capsys.readouterr().out
    # with the trained adapter: its rank is read from the adapter dir, results equal detox's
    assert main(ev + ["--out", str(tmp_path / "ev"), "--trained", str(run / "final")]) == 0
    assert "95% CI" in capsys.readouterr().out
    assert (tmp_path / "ev" / "eval" / "aligned.jsonl").read_text().splitlines() == trained_after
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["estimator"] == advantage
    # not an adapter dir, and an eval over a training run, are refused in one line
    assert main(ev + ["--out", str(tmp_path / "x"), "--trained", str(tmp_path)]) == 2
    assert "no readable adapter_config.json" in capsys.readouterr().err
    assert main(ev + ["--out", str(run)]) == 2
    assert "holds a training run" in capsys.readouterr().err
