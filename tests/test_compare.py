"""`tether compare`: several detox run dirs in one table and one HTML page. The run dirs are fakes
built in seconds, but their report.json is the one tether writes: report.py's own build_report
on synthetic per-prompt rows, and config.yaml is config_to_yaml of a DetoxConfig."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import one_line_error

from tether.cli import main
from tether.compare import compare_runs, estimator_summary, summary_table, write_compare_html
from tether.config import DetoxConfig
from tether.errors import TetherError
from tether.options import config_to_yaml, options
from tether.report import build_report

TETHER = str(Path(sys.executable).parent / "tether")
N = 24  # held-out prompts per fake run


def make_run(
    root: Path,
    name: str,
    advantage: str | None,
    seed: int,
    drop: float,
    similarity: bool = True,
    **cfg,
) -> Path:
    """A finished detox run dir: eval rows before/after (toxicity down by about `drop`),
    run_info.json, config.yaml; report.json written as write_report writes it. `advantage`
    None: a run from before the option existed (no key in its config.yaml)."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    rng = random.Random(f"{name}-{seed}")
    before, after = [], []
    for i in range(N):
        tox, gold, ppl, sim = rng.random(), rng.random(), 10 + 5 * rng.random(), rng.random()
        common = {"prompt": f"prompt {i}", "response_tokens": 12, "ended_with_eos": i % 2 == 0}
        before.append(
            {**common, "completion": "you fool", "proxy": tox, "gold": gold, "perplexity": ppl}
        )
        after.append(
            {
                **common,
                "completion": "you friend",
                "proxy": tox * (1 - drop) * (0.9 + 0.2 * rng.random()),
                "gold": gold * (1 - drop / 2) + 0.05 * (rng.random() - 0.5),
                "perplexity": ppl * (1 + 0.1 * rng.random()),
            }
        )
        if similarity:
            before[-1]["similarity"] = sim
            after[-1]["similarity"] = sim * (0.97 + 0.04 * rng.random())
    for arm, rows in (("baseline", before), ("aligned", after)):
        (run / "eval" / f"{arm}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = {
        "proxy_metric": "proxy",
        "proxy_lower_is_better": True,
        "judge_metric": "gold",
        "judge_lower_is_better": True,
        "evaluated_adapter": str(run / "final"),
        "eval_seed": 1234,
        "timing_seconds": {"baseline": 30.0, "ppo": 600.0 + seed, "aligned": 31.0, "total": 665.0},
    }
    (run / "run_info.json").write_text(json.dumps(info))
    fields = {o.name for o in options(DetoxConfig)}
    kw = {"out": str(run), "seed": seed, "similarity": similarity, **cfg}
    if advantage is not None and "advantage" in fields:
        kw["advantage"] = advantage
    config = yaml.safe_load(config_to_yaml(DetoxConfig.from_flat(**kw)))
    config.pop("advantage", None)
    if advantage is not None:
        config["advantage"] = advantage
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run / "report.json").write_text(json.dumps(build_report(run), indent=2))  # as write_report
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return [
        make_run(root, "gae-s0", "gae", 0, drop=0.4),
        make_run(root, "gae-s1", None, 1, drop=0.2),  # an old run: no `advantage`, so gae
        make_run(root, "grpo-s0", "grpo", 0, drop=0.5, similarity=False),
    ]


def _report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def _section(report: dict, metric: str) -> dict | None:
    if metric in ("proxy", "judge"):
        return report["toxicity"][metric]
    return report["quality"].get(metric)


def test_table_numbers_are_the_reports(runs):
    rows = compare_runs(runs)
    assert [r["estimator"] for r in rows] == ["gae", "gae", "grpo"]
    assert [r["seed"] for r in rows] == [0, 1, 0]
    text = summary_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["run", "estimator", "seed"]
    for run, row in zip(runs, rows, strict=True):
        report = _report(run)
        assert row["rl_seconds"] == report["timing_seconds"]["ppo"]
        assert row["total_seconds"] == report["timing_seconds"]["total"]
        line = next(line for line in lines if line.startswith(str(run)))
        assert line.split()[1:3] == [row["estimator"], str(row["seed"])]
        for metric in ("proxy", "judge", "perplexity", "similarity"):
            want = _section(report, metric)
            got = row["metrics"][metric]
            if want is None:  # --no-similarity
                assert got is None and "n/a" in line
                continue
            base = abs(want["before_mean"])
            assert got["relative_change"] == want["relative_change"]
            assert got["relative_ci95_low"] == want["ci95_low"] / base
            assert got["relative_ci95_high"] == want["ci95_high"] / base
            assert got["ci_excludes_zero"] == want["ci_excludes_zero"]
            assert got["relative_ci95_low"] <= got["relative_change"] <= got["relative_ci95_high"]
            cell = (
                f"{100 * want['relative_change']:+.1f}% [{100 * want['ci95_low'] / base:+.1f}, "
                f"{100 * want['ci95_high'] / base:+.1f}]{'*' if want['ci_excludes_zero'] else ''}"
            )
            assert cell in line, (metric, line)
        assert f"{report['timing_seconds']['ppo'] / 60:.1f} min" in line
    # the fakes cut toxicity clearly: the proxy CI excludes zero in every run
    assert all(r["metrics"]["proxy"]["ci_excludes_zero"] for r in rows)
    assert "proxy = proxy; judge = gold" in text
    assert "note:" not in text  # one metric, one prompt count, gae runs differ only by seed


def test_mean_and_range_per_estimator_over_seeds(runs):
    rows = compare_runs(runs)
    (gae,) = estimator_summary(rows)  # grpo has one run: no summary line
    assert gae["estimator"] == "gae" and gae["seeds"] == [0, 1]
    reports = [_report(r) for r in runs[:2]]
    for metric in ("proxy", "judge", "perplexity", "similarity"):
        changes = [_section(r, metric)["relative_change"] for r in reports]
        stats = gae["metrics"][metric]
        assert stats["mean"] == pytest.approx(sum(changes) / 2)
        assert (stats["min"], stats["max"]) == (min(changes), max(changes))
    text = summary_table(rows)
    (line,) = [line for line in text.splitlines() if line.startswith("gae ")]
    changes = [r["toxicity"]["proxy"]["relative_change"] for r in reports]
    mean, lo, hi = (100 * x for x in (sum(changes) / 2, min(changes), max(changes)))
    assert "2 runs, seeds 0,1" in line
    assert f"proxy {mean:+.1f}% ({lo:+.1f}%..{hi:+.1f}%)" in line
    assert not any(line.startswith("grpo ") for line in text.splitlines())


def test_runs_of_one_estimator_that_differ_beyond_the_seed_are_noted(runs, tmp_path):
    other = make_run(tmp_path, "gae-lr", "gae", 2, drop=0.3, lr=1e-3)
    text = summary_table(compare_runs([*runs, other]))
    assert "3 runs, seeds 0,1,2" in text
    assert "note: the gae runs differ in more than their seed (lr)" in text


def test_html_page_is_self_contained_and_escapes_run_names(runs, tmp_path, capsys):
    evil = make_run(tmp_path, "<script>alert(1)", "rloo", 3, drop=0.3)
    out = tmp_path / "page.html"
    assert main(["compare", str(runs[0]), str(evil), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f"report: {out}" in stdout and "<script>alert(1)" in stdout  # the terminal is text
    page = out.read_text()
    assert "<script" not in page and "&lt;script&gt;alert(1)" in page
    assert page.count("data:image/png;base64,") == 1
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere
    for cell in summary_table(compare_runs([runs[0], evil])).splitlines()[2].split("  "):
        if cell.strip() and "<" not in cell:
            assert cell.strip() in page


def test_missing_or_garbled_report_is_a_one_line_error(runs, tmp_path, capsys):
    out = ["--out", str(tmp_path / "c.html")]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert one_line_error(["compare", str(runs[0]), str(empty), *out], capsys) == (
        f"error: {empty}: no report.json (not a finished tether detox run)"
    )
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "report.json").write_text('{"toxicity": {"proxy": ')
    assert one_line_error(["compare", str(garbled), *out], capsys).startswith(
        f"error: {garbled / 'report.json'}: not valid JSON ("
    )
    assert not (tmp_path / "c.html").exists()
    with pytest.raises(SystemExit) as exc:  # nothing given: argparse's usage error
        main(["compare"])
    assert exc.value.code == 2
    assert "the following arguments are required: RUN" in capsys.readouterr().err


def _error(run_dirs) -> str:
    """compare_runs' TetherError: one line (main prints it as `error: ...`, exit 2)."""
    with pytest.raises(TetherError) as exc:
        compare_runs(run_dirs)
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_other_bad_run_dirs(runs, tmp_path):
    assert _error([tmp_path / "nope"]) == f"{tmp_path / 'nope'}: no such run directory"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "hacking_report.json").write_text("{}")
    assert "a tether hacking-demo run" in _error([bad])
    report_json = bad / "report.json"
    report_json.write_text("[1, 2]")
    assert _error([bad]) == f"{report_json}: not a tether detox report (not a JSON object)"
    report_json.write_text(json.dumps({"toxicity": {}, "quality": {}}))
    assert "not a tether detox report (no toxicity.proxy)" in _error([bad])
    report = _report(runs[0])
    del report["toxicity"]["judge"]["ci95_high"]
    report_json.write_text(json.dumps(report))
    assert "(no toxicity.judge.ci95_high)" in _error([bad])
    report["toxicity"]["judge"]["ci95_high"] = "high"
    report_json.write_text(json.dumps(report))
    assert "(toxicity.judge.ci95_high is not a number)" in _error([bad])
    report_json.write_text(json.dumps(_report(runs[0])))
    (bad / "config.yaml").write_text("seed: [0\n")
    assert _error([bad]).startswith(f"{bad / 'config.yaml'}: not valid YAML (")
    assert "given twice" in _error([runs[0], f"{runs[0]}/"])
    rows = compare_runs(runs[:1])
    with pytest.raises(TetherError, match="cannot write"):
        write_compare_html(rows, tmp_path / "no-dir" / "c.html")


def test_compare_as_a_user_runs_it(runs, tmp_path):
    proc = subprocess.run(
        [TETHER, "compare", *map(str, runs)], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].split()[:3] == ["run", "estimator", "seed"]
    assert "per estimator" in proc.stdout and "report: compare.html" in proc.stdout
    page = (tmp_path / "compare.html").read_text()  # the default --out, in the current directory
    assert all(str(run) in page for run in runs)
