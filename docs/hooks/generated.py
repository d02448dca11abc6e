"""MkDocs hook: the reference pages are generated from bdvae's own code, so they cannot drift.

- docs/cli.md holds, under each sub-command's heading, a marker `<!-- help: train -->` (or
  `<!-- help: sampler fit -->`), which becomes that sub-command's `--help`. A sub-command without a
  marker, or a marker naming none, fails the build.
- docs/configuration.md holds the marker `<!-- config: keys -->`, which becomes a table per config
  section: every key, its default and its meaning, the docstring under its dataclass field.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re

HELP = re.compile(r"<!-- help: ([a-z_ ]+) -->")
CONFIG = "<!-- config: keys -->"


def subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> dict[str, argparse.ArgumentParser]:
    """Every leaf sub-command of `parser`: {"train": parser, "sampler fit": parser, ...}."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                inner = subcommands(sub, (*prefix, name))
                found.update(inner or {" ".join((*prefix, name)): sub})
    return found


def cli_page(markdown: str) -> str:
    from bdvae.__main__ import build_parser

    os.environ["COLUMNS"] = "80"  # argparse wraps help at the terminal's width: the same on every machine
    commands = subcommands(build_parser())
    named = HELP.findall(markdown)
    missing = sorted(set(commands) - set(named))
    unknown = sorted(set(named) - set(commands))
    if missing or unknown:
        raise ValueError(f"docs/cli.md: sub-commands without a help marker: {missing}; markers naming none: {unknown}")
    return HELP.sub(lambda m: f"```text\n{commands[m.group(1)].format_help().rstrip()}\n```", markdown)


def config_tables() -> str:
    from bdvae.config import SECTIONS, meanings, toml_value

    meaning = meanings()
    out = []
    for section, cls in SECTIONS.items():
        out += [f"## `[{section}]`", "", "| key | default | meaning |", "| --- | --- | --- |"]
        for f in dataclasses.fields(cls):
            default = "unset" if f.default is None else f"`{toml_value(f.default)}`"
            out.append(f"| `{section}.{f.name}` | {default} | {meaning[f'{section}.{f.name}'].replace('|', '&#124;')} |")
        out.append("")
    return "\n".join(out)


def config_page(markdown: str) -> str:
    if markdown.count(CONFIG) != 1:
        raise ValueError(f"docs/configuration.md must hold {CONFIG} once")
    return markdown.replace(CONFIG, config_tables())


PAGES = {"cli.md": cli_page, "configuration.md": config_page}


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    make = PAGES.get(page.file.src_uri)
    return make(markdown) if make else markdown
