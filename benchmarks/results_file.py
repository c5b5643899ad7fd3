"""Shared by the benchmark scripts: update one section of benchmarks/RESULTS.md.

Each benchmark owns one `## ` section (its heading names the script). Writing replaces that
section in place and leaves every other section untouched.
"""

from __future__ import annotations

import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = (
    "# Benchmark results\n\n"
    "Every number here comes from a script in benchmarks/; each section names its command.\n"
)


def replace_section(text: str, heading: str, section: str) -> str:
    """`text` with the section starting at `heading` replaced by `section` (or appended)."""
    start = text.find(heading)
    if start < 0:
        return text.rstrip() + "\n\n" + section.rstrip() + "\n"
    end = text.find("\n## ", start + len(heading))
    rest = "" if end < 0 else "\n" + text[end + 1 :]
    return text[:start] + section.rstrip() + "\n" + rest


def write_section(heading: str, section: str, results: Path = RESULTS) -> None:
    """Replace (or add) one benchmark's section of RESULTS.md (or of `results`)."""
    existing = results.read_text() if results.exists() else HEADER
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(replace_section(existing, heading, section))


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def publish(heading: str, section: str, write: bool) -> None:
    """Print a benchmark's section, and when `write`, replace it in RESULTS.md."""
    print(section)
    if write:
        write_section(heading, section)
