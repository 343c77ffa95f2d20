"""What every results file in benchmarks/results/ records (the date, the machine that measured
it, tether's version and commit), and the one table printer the scripts share: aligned text on
the terminal, Markdown (`--markdown`) for the docs' results and performance pages, which are
built from these files and nothing else."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu() -> str:
    """The CPU model and the vector extensions that decide its fp32/bf16 kernels (lscpu)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    model = fields.get("Model name", "unknown CPU").strip()
    flags = set(fields.get("Flags", "").split())
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return (
        f"{model}, {os.cpu_count()} CPUs, {' '.join(f for f in wanted if f in flags) or 'no AVX2'}"
    )


def revision(root: Path = ROOT) -> str:
    """The checkout's commit, with `+dirty` where it has uncommitted changes."""
    git = ["git", "-C", str(root)]
    try:
        rev = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return rev.strip() + ("+dirty" if dirty.stdout.strip() else "") or "unknown"


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def provenance() -> dict[str, str]:
    """The keys every results file starts with."""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": cpu(),
        "tether": _version("tether"),
        "revision": revision(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
    }


def measured_line(record: dict, commit: bool = True) -> str:
    """'measured DATE on MACHINE; tether V (commit)' from a results file's keys (the README
    leaves the commit out)."""
    machine = record.get("machine") or record.get("cpu", "an unrecorded machine")
    line = f"measured {record['date'][:10]} on {machine}"
    if "tether" in record:
        line += f"; tether {record['tether']}"
        line += f" ({record.get('revision', '?')[:12]})" if commit else ""
    return line


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], markdown: bool = False) -> str:
    """Rows as aligned text, or as a Markdown table. Numbers are right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    numeric = [
        all(_is_number(row[i]) for row in cells) if cells else False for i in range(len(headers))
    ]
    if markdown:
        rule = ["---:" if n else "---" for n in numeric]
        lines = [headers, rule, *cells]
        return "\n".join("| " + " | ".join(line) + " |" for line in lines)
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def fmt(line: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if n else c.ljust(w) for c, w, n in zip(line, widths, numeric, strict=True)
        ).rstrip()

    return "\n".join([fmt(list(headers)), *(fmt(r) for r in cells)])


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("x%").replace(",", ""))
    except ValueError:
        return False
    return True
