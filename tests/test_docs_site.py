"""The documentation site builds with `mkdocs build --strict`, and its configuration reference names
every key of tinylm/config.py with its default and allowed values.

The build tests need the `docs` extra (`pip install -e '.[docs]'`) and skip without it; the
reference tests need nothing but tinylm.
"""

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tinylm import config as cfg
from tinylm.config_reference import KEY_HELP, reference_markdown
from tinylm.train import OVERRIDES

ROOT = Path(__file__).resolve().parents[1]


def documented_build_env() -> dict[str, str]:
    """The `NAME=value` settings docs/index.md puts before `mkdocs build --strict`, the command it tells you to run."""
    page = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    match = re.search(r"`((?:\w+=\S+ )*)mkdocs build --strict`", page)
    assert match, "docs/index.md does not show the `mkdocs build --strict` command"
    return dict(setting.split("=", 1) for setting in match.group(1).split())


def build(project: Path, site: Path) -> subprocess.CompletedProcess:
    """`mkdocs build --strict` of `project`/mkdocs.yml into `site`, as docs/index.md says to run it."""
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
    pytest.importorskip("material", reason="the docs extra is not installed: pip install -e '.[docs]'")
    env = {key: value for key, value in os.environ.items() if key != "NO_MKDOCS_2_WARNING"}
    env.update(documented_build_env())
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(project / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=project, env=env, capture_output=True, text=True, timeout=300,
    )


def copy_project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", project)
    shutil.copytree(ROOT / "docs", project / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    (project / "tinylm").symlink_to(ROOT / "tinylm")  # what the hook renders the reference from (and `watch`)
    return project


def test_site_builds_strict(tmp_path):
    result = build(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    # mkdocs-material's red box about MkDocs 2.0 reads as a failure: the documented command hides it.
    assert "MkDocs 2.0" not in result.stdout + result.stderr
    # A `\|` in a table's code span (Python-Markdown keeps a `|` inside backticks) shows its backslash.
    escaped = [path.relative_to(tmp_path / "site").as_posix() for path in sorted((tmp_path / "site").rglob("*.html"))
               if "\\|" in path.read_text(encoding="utf-8")]
    assert not escaped, f"a literal \\| on the built pages {escaped}: write | plainly inside backticks"
    page = (tmp_path / "site" / "configuration" / "index.html").read_text(encoding="utf-8")
    for name, section in cfg.SECTIONS.items():
        for field in dataclasses.fields(section):
            assert f"<code>{field.name}</code>" in page, f"{name}.{field.name} is not on the built page"
    assert not (ROOT / "docs" / "configuration.md").exists(), "configuration.md is generated at build time"


def slugs(markdown: str) -> dict[str, str]:
    """Heading line -> its anchor, as MkDocs' toc extension makes it."""
    from markdown.extensions.toc import slugify

    return {line: slugify(line.lstrip("#").strip().replace("`", ""), "-")
            for line in markdown.splitlines() if re.match(r"#{2,3} ", line)}


def test_a_renamed_heading_that_a_page_links_to_fails_the_build(tmp_path):
    project = copy_project(tmp_path)
    docs = project / "docs"
    links = "\n".join(p.read_text(encoding="utf-8") for p in docs.glob("*.md") if p.name != "training.md")
    training = (docs / "training.md").read_text(encoding="utf-8")
    linked = [(line, slug) for line, slug in slugs(training).items() if f"training.md#{slug})" in links]
    assert linked, "no other page links to a heading of training.md: pick another page to rename in"
    line, slug = linked[0]
    (docs / "training.md").write_text(training.replace(line + "\n", line + " renamed\n", 1), encoding="utf-8")
    result = build(project, tmp_path / "site")
    assert result.returncode != 0
    assert f"#{slug}" in result.stdout + result.stderr


@pytest.mark.parametrize("link", ["training.md#no-such-heading", "configuration.md#no-such-section",
                                  "no-such-page.md", "#no-such-anchor"])
def test_a_broken_link_fails_the_build(tmp_path, link):
    project = copy_project(tmp_path)
    index = project / "docs" / "index.md"
    index.write_text(index.read_text(encoding="utf-8") + f"\nSee [this]({link}).\n", encoding="utf-8")
    result = build(project, tmp_path / "site")
    assert result.returncode != 0
    assert link.split("#")[-1] in result.stdout + result.stderr


def section_rows(markdown: str, name: str) -> dict[str, str]:
    """Key -> its table row, in the `[name]` section of the reference."""
    body = markdown.split(f"## `[{name}]`\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in body.splitlines():
        match = re.match(r"\| `(\w+)`(<br>| \|)", line)
        if match:
            rows[match.group(1)] = line
    return rows


def toml(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(map(toml, value)) + "]"
    return f'"{value}"' if isinstance(value, str) else str(value)


def test_reference_names_every_key_with_its_default_and_choices():
    markdown = reference_markdown()
    for name, section in cfg.SECTIONS.items():
        rows = section_rows(markdown, name)
        fields = dataclasses.fields(section)
        assert list(rows) == [f.name for f in fields], f"[{name}]: the reference's keys differ from the dataclass"
        defaults = section()
        for field in fields:
            dotted, row = f"{name}.{field.name}", rows[field.name]
            default = getattr(defaults, field.name)
            cells = [c.strip() for c in row.strip("|").split(" | ")]
            assert cells[1] == {bool: "boolean", int: "integer", float: "float", str: "string",
                                list: "array of strings"}[type(default)]
            assert cells[2] == f"`{toml(default)}`", dotted
            for choice in cfg.CHOICES.get(dotted, ()):
                assert f'`"{choice}"`' in cells[3], f"{dotted}: choice {choice!r} is not listed"
            if dotted in cfg.POSITIVE:
                assert "**Allowed:** greater than 0" in cells[3], dotted
            if dotted in cfg.NON_NEGATIVE - {"training.seed"}:
                assert "**Allowed:** 0 or more" in cells[3], dotted
            if dotted in cfg.UNIT_INTERVAL:
                low, high = cfg.UNIT_INTERVAL[dotted]
                assert f"at least {low} and less than {high}" in cells[3], dotted
            assert cells[3].startswith(KEY_HELP[dotted]), dotted
            flag = [f"--{flag.replace('_', '-')}" for flag, key in OVERRIDES.items() if key == dotted]
            assert (f"<br>`{flag[0]}`" in cells[0]) if flag else cells[0] == f"`{field.name}`", dotted
    assert str(cfg.MAX_SEED) in section_rows(markdown, "training")["seed"]
    assert all(f'`"{layer}"`' in section_rows(markdown, "lora")["target_modules"] for layer in cfg.LORA_TARGETS)


def test_every_key_has_a_meaning_and_every_meaning_a_key():
    keys = {f"{name}.{f.name}" for name, section in cfg.SECTIONS.items() for f in dataclasses.fields(section)}
    assert set(KEY_HELP) == keys
    assert all(help.strip() for help in KEY_HELP.values())


def test_home_page_commands_are_the_readmes():
    def blocks(path):
        return re.findall(r"```bash\n(.*?)\n```", path.read_text(encoding="utf-8"), re.S)

    home, readme = blocks(ROOT / "docs" / "index.md"), blocks(ROOT / "README.md")
    assert len(home) == 2 and all(block in readme for block in home), "docs/index.md's commands differ from the README's"


WIDEST_COMMAND = 90  # characters: wider, and a code block's line scrolls out of the page's column


@pytest.mark.parametrize("page", ["data-pipeline.md"])
def test_first_command_block_fits_the_column(page):
    """The commands a page opens with are read and copied whole: no line scrolls out of sight."""
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)\n```", text, re.S).group(1)
    wide = [line for line in block.splitlines() if len(line) > WIDEST_COMMAND]
    assert not wide, f"docs/{page}: lines over {WIDEST_COMMAND} characters in its first code block: {wide}"


# Words that speak to tinylm's maintainers (its tests, its issues, its history), not to its users.
MAINTAINER_TALK = ["a test checks", "a test records", "closing notes", "the issue", "this project was built",
                   "tests/test_", "in the tests"]


def test_user_pages_speak_to_users():
    """A user cannot read the test suite or the issue tracker: a page says what holds for them instead.
    (docs/testing.md is the page about the tests.)"""
    found = [f"{path.name}: {phrase!r}" for path in sorted((ROOT / "docs").glob("*.md")) if path.name != "testing.md"
             for phrase in MAINTAINER_TALK if phrase in path.read_text(encoding="utf-8").lower()]
    assert not found, found
