"""docs/troubleshooting.md and the messages that link to it, checked in both directions.

Every anchor a message names is a section of the page, every section of the page (but the
closing list of other messages) is named by a message the code really prints, and every
link to the page from the docs or the README lands on a section.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tinylm import data, errors, paths, prepare
from tinylm.errors import UserError
from tinylm.hardware import choose_hardware

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / paths.TROUBLESHOOTING
CLOSING_LIST = "other-common-messages"  # a list of messages that need no section of their own
LINK = re.compile(r"troubleshooting\.md#([a-z0-9-]+)")


def slug(heading: str) -> str:
    """The anchor MkDocs (and GitHub) give a heading: lowercase, punctuation dropped, spaces as dashes."""
    return re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", heading.strip().lower()))


def sections() -> set[str]:
    return {slug(line[3:]) for line in PAGE.read_text(encoding="utf-8").splitlines() if line.startswith("## ")}


def printed_messages(root: Path) -> list[str]:
    """One real message per kind of problem the page explains, as the code prints it."""
    messages = []

    def caught(call) -> None:
        with pytest.raises(UserError) as info:
            call()
        messages.append(str(info.value))

    text = root / "input.txt"
    text.write_text("KING:\nWhat says the king, my lord, to this?\n\n" * 40, encoding="utf-8")
    empty = root / "empty"
    empty.mkdir()
    caught(lambda: data.resolve(str(empty), "bin", "char"))  # no .bin files at all
    orphan = root / "orphan"
    orphan.mkdir()
    (orphan / "train.bin").write_bytes(b"\0\0" * 10)
    caught(lambda: data.resolve(str(orphan), "bin", "char"))  # .bin files without meta.json
    assert prepare.main(["--input", str(text), "--tokenizer", "bpe", "--vocab-size", "300",
                         "--out", str(root / "bpe")]) == 0
    caught(lambda: data.resolve(str(root / "bpe"), "bin", "char"))  # char asked, bpe prepared
    if not torch.cuda.is_available():
        messages += choose_hardware("cuda", "fp32").warnings
    return messages


def test_every_message_links_a_section_and_every_section_is_linked_from_a_message(tmp_path):
    assert set(errors.ANCHORS) == sections() - {CLOSING_LIST}
    linked = {anchor for message in printed_messages(tmp_path) for anchor in LINK.findall(message)}
    expected = set(errors.ANCHORS) - (set() if not torch.cuda.is_available() else {errors.CUDA_NOT_DETECTED})
    assert linked == expected


def test_a_link_to_a_section_that_does_not_exist_is_refused():
    with pytest.raises(ValueError, match="not a section of docs/troubleshooting.md"):
        errors.troubleshooting_link("no-such-section")


@pytest.mark.parametrize("page", sorted([*(REPO / "docs").glob("*.md"), REPO / "README.md"]), ids=lambda p: p.name)
def test_links_to_the_page_from_the_docs_land_on_a_section(page):
    assert set(LINK.findall(page.read_text(encoding="utf-8"))) <= sections()
