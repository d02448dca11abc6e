"""The documentation against the code: the configuration table, the command-line page, the API
page, pointers from code to pages, and the README as a short front door.

The site itself is built by `mkdocs build --strict` (the README's ci:docs block), which fails on a
broken link or anchor; these tests need no MkDocs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import tomllib
import types
import unicodedata
from pathlib import Path

import pytest

import bdvae
from bdvae.config import SECTIONS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
POINTER = re.compile(r"docs/([\w./-]+\.md)(?:#([\w-]+))?")


def slug(heading: str) -> str:
    """The anchor MkDocs gives a heading (Python-Markdown's toc slugify, after its inline markup)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (outside fenced code)."""
    found, fenced = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)", line)):
            found.add(slug(m.group(1)))
    return found


def test_slug_follows_mkdocs():
    assert slug("The likelihood: −ln p(x)") == "the-likelihood-ln-px"
    assert slug("`[data]`") == "data"
    assert slug("Sample quality: the reference classifier") == "sample-quality-the-reference-classifier"


def _configuration_rows() -> dict[str, str]:
    """{"section.key": default cell} of docs/configuration.md's tables, as the site's hook renders them."""
    page = types.SimpleNamespace(file=types.SimpleNamespace(src_uri="configuration.md"))
    rows = {}
    for line in _hook().on_page_markdown((DOCS / "configuration.md").read_text(encoding="utf-8"), page).splitlines():
        if m := re.match(r"\| `(\w+\.\w+)` \| ([^|]+) \|", line):
            assert m.group(1) not in rows, f"{m.group(1)} is listed twice"
            rows[m.group(1)] = m.group(2).strip()
    return rows


def test_configuration_page_lists_every_key_with_its_default():
    rows = _configuration_rows()
    keys = {f"{section}.{f.name}": f for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert sorted(rows) == sorted(keys), "docs/configuration.md and the config dataclasses list different keys"
    for key, cell in rows.items():
        default = keys[key].default
        if cell.startswith("unset"):
            assert default is None, f"{key}: the page says unset, the default is {default!r}"
            continue
        literal = re.fullmatch(r"`([^`]+)`", cell)
        assert literal, f"{key}: a default is a TOML literal in backticks or 'unset', got {cell!r}"
        value = tomllib.loads(f"v = {literal.group(1)}")["v"]
        expected = list(default) if isinstance(default, tuple) else default
        assert value == expected and type(value) is type(expected), f"{key}: the page says {value!r}, the default is {default!r}"


def test_configuration_page_names_every_setting_that_does_not_make_another_run():
    from bdvae.config import MACHINE_KEYS

    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    paragraph = next(p for p in text.split("\n\n") if "same run to `compare`" in p)
    assert sorted(re.findall(r"`(\w+\.\w+)`", paragraph)) == sorted(MACHINE_KEYS)


def _hook():
    spec = importlib.util.spec_from_file_location("generated", DOCS / "hooks" / "generated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_page_gives_every_subcommand_its_help():
    hook = _hook()
    from bdvae.__main__ import build_parser

    commands = hook.subcommands(build_parser())
    assert {"train", "evaluate", "sampler fit", "data fetch"} <= set(commands)
    page = types.SimpleNamespace(file=types.SimpleNamespace(src_uri="cli.md"))
    rendered = hook.on_page_markdown((DOCS / "cli.md").read_text(encoding="utf-8"), page)
    for name in commands:
        assert f"usage: bdvae {name} " in rendered, f"docs/cli.md lacks the help of bdvae {name}"
        assert f"### bdvae {name}\n" in rendered, f"docs/cli.md has no heading for bdvae {name}"
    with pytest.raises(ValueError, match="evaluate"):  # a sub-command without its place fails the build
        hook.on_page_markdown(rendered.replace("<!-- help: evaluate -->", ""), page)
    with pytest.raises(ValueError, match="evaluate"):
        hook.on_page_markdown((DOCS / "cli.md").read_text(encoding="utf-8").replace("<!-- help: evaluate -->", ""), page)


def test_api_page_documents_every_public_name():
    text = (DOCS / "python-api.md").read_text(encoding="utf-8")
    public = [name for name in bdvae.__all__ if not name.startswith("_")]
    assert public
    for name in public:
        where = f"{getattr(bdvae, name).__module__}.{name}"  # bdvae.api.train, bdvae.tracking.Callback, ...
        assert f"::: {where}\n" in text, f"docs/python-api.md does not document bdvae.{name} ({where})"


def _pointers() -> list[tuple[Path, str, str | None]]:
    found = []
    for folder in ("src", "tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".toml", ".sh") and "egg-info" not in str(path) and path.name != "test_docs.py":
                for m in POINTER.finditer(path.read_text(encoding="utf-8")):
                    found.append((path, m.group(1), m.group(2)))
    return found


def test_pointers_from_code_name_pages_and_anchors_that_exist():
    pointers = _pointers()
    assert len(pointers) >= 10  # the code does point at pages: an empty scan would prove nothing
    for path, page, anchor in pointers:
        where = f"{path.relative_to(ROOT)} points at docs/{page}" + (f"#{anchor}" if anchor else "")
        assert (DOCS / page).is_file(), f"{where}, which does not exist"
        if anchor:
            assert anchor in anchors(DOCS / page), f"{where}, which has no such heading"


def test_code_points_at_no_readme_section():
    for folder in ("src", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".toml", ".sh") and "egg-info" not in str(path):
                text = path.read_text(encoding="utf-8")
                assert not re.search(r"README[,:]? *[\"A-Z]", text), f"{path.relative_to(ROOT)} points into the README"


def test_readme_is_a_short_front_door():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    for block in ("setup", "test", "docs"):
        assert f"<!-- ci:{block} -->\n```bash\n" in text, f"README.md lacks its ci:{block} block"
    links = re.findall(r"\]\(([^)#\s]+)(?:#([\w-]+))?\)", text)
    local = [(target, anchor) for target, anchor in links if "://" not in target]
    assert len(local) >= 10
    for target, anchor in local:
        assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"
        if anchor:
            assert anchor in anchors(ROOT / target), f"README.md links to {target}#{anchor}, which has no such heading"


def test_every_test_the_pages_name_exists():
    """The guarantees name the tests that show them: each named test must be there."""
    named = 0
    for page in sorted(DOCS.rglob("*.md")):
        for line in page.read_text(encoding="utf-8").splitlines():
            current = None  # `::test_x` after `tests/test_y.py::...` on the same line is in test_y.py
            for m in re.finditer(r"tests/(test_\w+\.py)(?:::(\w+))?|`::(\w+)`", line):
                current, name = m.group(1) or current, m.group(2) or m.group(3)
                where = f"docs/{page.relative_to(DOCS)} names tests/{current}" + (f"::{name}" if name else "")
                assert current and (ROOT / "tests" / current).is_file(), where
                if name:
                    assert re.search(rf"^def {name}\(", (ROOT / "tests" / current).read_text(encoding="utf-8"), re.M), where
                    named += 1
    assert named >= 10
