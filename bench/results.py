"""bench/RESULTS.md is written by several scripts: each replaces its own `## ` section and keeps the others."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def replace_section(section: str) -> None:
    """Put `section` (starting with its `## Title` line) in place of the section of that title, or append it."""
    title = section.splitlines()[0]
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    head, *sections = text.split("\n## ")
    kept = ["## " + s.rstrip() for s in sections if ("## " + s).splitlines()[0] != title]
    RESULTS.write_text("\n\n".join([head.rstrip(), *kept, section.rstrip()]) + "\n")


def replace_head(head: str) -> None:
    """Put `head` (the title and the main tables, no `## ` section) in place of what precedes the first section."""
    text = RESULTS.read_text() if RESULTS.exists() else ""
    _, *sections = text.split("\n## ")
    RESULTS.write_text("\n\n".join([head.rstrip(), *("## " + s.rstrip() for s in sections)]) + "\n")
