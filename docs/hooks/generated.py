"""MkDocs hook: the command-line reference is generated from bdvae's own argument parser.

docs/cli.md holds, under each sub-command's heading, a marker `<!-- help: train -->` (or
`<!-- help: sampler fit -->`); this hook replaces it with that sub-command's `--help`, so the page
cannot drift from the code. A sub-command without a marker, or a marker naming none, fails the build.
"""

from __future__ import annotations

import argparse
import os
import re

MARKER = re.compile(r"<!-- help: ([a-z_ ]+) -->")


def subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> dict[str, argparse.ArgumentParser]:
    """Every leaf sub-command of `parser`: {"train": parser, "sampler fit": parser, ...}."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                inner = subcommands(sub, (*prefix, name))
                found.update(inner or {" ".join((*prefix, name)): sub})
    return found


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    if page.file.src_uri != "cli.md":
        return markdown
    from bdvae.__main__ import build_parser

    os.environ["COLUMNS"] = "80"  # argparse wraps help at the terminal's width: the same on every machine
    commands = subcommands(build_parser())
    named = MARKER.findall(markdown)
    missing = sorted(set(commands) - set(named))
    unknown = sorted(set(named) - set(commands))
    if missing or unknown:
        raise ValueError(f"docs/cli.md: sub-commands without a help marker: {missing}; markers naming none: {unknown}")
    return MARKER.sub(lambda m: f"```text\n{commands[m.group(1)].format_help().rstrip()}\n```", markdown)
