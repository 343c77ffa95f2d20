"""Pages generated at build time (mkdocs-gen-files): the reference from the code, the results
and performance tables from benchmarks/results/ through each benchmark script's `--markdown`,
the home page from README.md and the changelog from CHANGELOG.md. Nothing here is written to
the source tree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs"))

from reference_md import cli_markdown, metrics_markdown, run_directory_markdown  # noqa: E402

from tether.cli import build_parser  # noqa: E402
from tether.rundir import RUN_LAYOUT  # noqa: E402
from tether.trainer import METRICS_FIELDS  # noqa: E402


def write(path: str, text: str, mode: str = "w") -> None:
    with mkdocs_gen_files.open(path, mode) as f:
        f.write(text)


def bench(*argv: str) -> str:
    """A benchmark script's --markdown output for one results file."""
    out = subprocess.run(
        [sys.executable, *argv, "--markdown"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


write("reference/cli.md", cli_markdown(build_parser()))
write("reference/metrics.md", metrics_markdown(METRICS_FIELDS))
write("reference/run-directory.md", run_directory_markdown(RUN_LAYOUT))

# the home page is the README, with its links made relative to docs/
readme = (ROOT / "README.md").read_text()


def _link(target: str) -> str:
    """A README link, as seen from docs/: the README links only into docs/ and the changelog."""
    path = target.split("#")[0]
    if path == "CHANGELOG.md":
        return "](changelog.md)"
    if path.startswith("docs/"):
        return f"]({target.removeprefix('docs/')})"
    raise SystemExit(f"README.md links to {target}: link a docs page instead (docs/...)")


readme = re.sub(r"\]\((?!https?:|#)([^)]+)\)", lambda m: _link(m[1]), readme)
write("index.md", readme)
write("changelog.md", (ROOT / "CHANGELOG.md").read_text())

DETOX = bench("benchmarks/headline.py", "show", "--only", "detox")
HACKING = bench("benchmarks/headline.py", "show", "--only", "hacking")
SPEED = bench("benchmarks/compare_trl.py", "--show", "benchmarks/results/compare_trl.json")
SPEED_GRPO = bench(
    "benchmarks/compare_trl.py", "--show", "benchmarks/results/compare_trl_grpo.json"
)
CHOICES = bench("benchmarks/cpu_choices.py", "--show", "benchmarks/results/cpu_choices.json")
ESTIMATORS = bench("benchmarks/estimators.py", "show")
LOSS_COST = bench("benchmarks/ppo_step.py", "--show", "benchmarks/results/policy_losses_step.json")

write(
    "results.md",
    f"""# Results

Current figures only, each table printed by the benchmark script that measured it from its
results file in `benchmarks/results/` (`--markdown`), with the date, the machine and the
version of tether that produced it. Regenerate the pictures with `make figures`; rerun a
measurement with the command above its table.

## Detox, over seeds

`python benchmarks/headline.py run --seeds 0 1 2`: `tether detox` with every default, one seed
after another; the wall-time row marks the runs that shared the cores with other work. Each change is the paired difference aligned - baseline
over the baseline mean, with its 95% bootstrap confidence interval over prompts.

![detox over seeds](img/detox_seeds.png)

{DETOX}

## The hacking demo

The same script runs `tether hacking-demo`: one short PPO job without the leash (no KL penalty,
a higher learning rate) and with it (adaptive KL), both probed on the same 32 held-out prompts
with a gold judge the reward never saw. [The guard](guides/guard.md) says how to read it.

![hacking demo](img/hacking_demo.png)

{HACKING}

## The estimators and policy losses on the detox default

`python benchmarks/estimators.py run --seed 0`: `tether detox` once per estimator (gae, grpo,
rloo, reinforce++) and per policy loss on grpo (clip-higher, GSPO, CISPO, SAPO), with every other
option at its default and the same seed, so each samples the same number of completions from
the same prompts. One seed each: read it as "each works on this recipe", not as a ranking.

![estimators](img/estimators.png)

{ESTIMATORS}

What the new losses cost per step, apart from any difference in what they learn:
`benchmarks/ppo_step.py --side-by-side` times GRPO with each of them, round after round, on the
same model and batch (every completion forced to the same length):

{LOSS_COST}

Two rounds of two steps each: the spread between rounds (up to 1.3 s) is as large as the
differences, and the plain run held the first slot of both rounds. The losses' own arithmetic
(`benchmarks/loss_cost.py`: 0.21 to 0.35 ms a micro-batch, eight micro-batches a step) cannot
account for more than a few milliseconds of a step.

## Speed and memory against TRL

`python benchmarks/compare_trl.py --only tether,trl011,tether-grpo,trl116-grpo --rounds 2
--llama-step both --save benchmarks/results/compare_trl.json`: each tether estimator beside its
peer on the same model, prompts, batch, LoRA, new tokens and mini-batch, each row its own
process, alternating. The `-nostep` rows decode through the model's own forward
(`TETHER_LLAMA_STEP=0`). Ratios depend on the CPU, which the table names.

{SPEED}

GRPO alone, three rounds (`--only tether-grpo --rounds 3`), against the GRPOTrainer row above:

{SPEED_GRPO}
""",
)
write(
    "performance.md",
    f"""

## Current figures

`python benchmarks/cpu_choices.py --only linears,sampler,step,fold --repeat 50 --save
benchmarks/results/cpu_choices.json`: each CPU-specific choice against the plain alternative,
side by side in one process.

{CHOICES}

A whole step against TRL's trainers is on the [results page](results.md#speed-and-memory-against-trl).
""",
    mode="a",
)
