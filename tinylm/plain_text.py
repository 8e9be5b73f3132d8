"""Plain text to prepare (`tinylm prepare --input`): the built-in corpus, a file, or a folder of files.

The text is read in chunks that end at line ends, so memory stays bounded however large the
input is, and exactly as stored (UTF-8, `\\r\\n` kept); a dataset passed as text, a binary file or
another encoding is refused with the flag to use instead.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, TextIO

from . import corpus, paths
from .errors import UserError

# Text is read in pieces of about CHUNK_CHARS characters (see encoding.ENCODE_BATCH).
CHUNK_CHARS = 1 << 13
SNIFF_BYTES = 1 << 13  # how much of an input file is looked at to tell text from binary


@dataclass
class Source:
    """The plain text to prepare: what meta.json records about it, and how to stream it."""

    name: str
    files: list[Path]  # read in this order; empty for the built-in corpus
    size: int  # bytes, for progress bars and the throughput summary
    text: str | None = None  # the built-in corpus, held in memory (about 5 MB)

    @classmethod
    def open(cls, spec: str) -> "Source":
        """The built-in corpus by name, or a text file, or every file in a folder (sorted by name)."""
        if spec == corpus.NAME:
            text = corpus.text()
            return cls(corpus.NAME, [], len(text.encode("utf-8")), text)
        path = Path(spec)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            refuse_dataset_input(path, files)
            if not files:
                raise UserError(f"input folder {path} holds no files: put .txt files in it, or pass a file")
        elif path.is_file():
            files = [path]
            refuse_dataset_input(path, files)
        else:
            raise UserError(
                f"input {path} does not exist: pass a text file, a folder of text files, or {corpus.NAME!r}"
            )
        size = sum(file.stat().st_size for file in files)
        if size == 0:
            raise UserError(f"input {path} is empty: pass a file with some text in it")
        return cls(str(path), files, size)

    def record(self, val_fraction: float) -> dict:
        """meta.json's `source`."""
        return {"input": self.name, "bytes": self.size, "val_fraction": val_fraction}

    def chunks(self) -> Iterator[str]:
        """The whole text, in chunks of about CHUNK_CHARS that end at line ends.

        Files of a folder are joined with a newline between them when one does not end with one.
        """
        if self.text is not None:
            yield from line_chunks(io.StringIO(self.text))
            return
        last = "\n"
        for path in self.files:
            if last != "\n":
                yield "\n"
            for chunk in file_chunks(path):
                yield chunk
                last = chunk[-1]


def refuse_dataset_input(path: Path, files: list[Path]) -> None:
    """A dataset passed to --input would be trained on as text (its JSON syntax, its bytes): say what to do."""
    if path.is_dir() and any((path / name).is_file() for name in paths.SAVED_DATASET_MARKERS):
        kind = "a datasets save_to_disk folder"
    else:
        suffixes = {f.suffix.lower() for f in files} & paths.DATASET_FILES.keys()
        kinds = sorted({paths.DATASET_FILES[suffix][1] for suffix in suffixes})
        if not kinds:
            return
        kind = f"{' and '.join(kinds)} data" if path.is_dir() else f"a {kinds[0]} file"
    raise UserError(
        f"input {path} is {kind}, not plain text: read it with --dataset {path} "
        "(--text-column NAME picks the column that holds the text, default 'text')"
    )


def line_chunks(handle: TextIO) -> Iterator[str]:
    """Read `handle` in chunks of about CHUNK_CHARS, each extended to the end of its line."""
    while chunk := handle.read(CHUNK_CHARS):
        # Ending chunks at line ends keeps words whole for BPE; the cap bounds memory on huge lines.
        yield chunk + handle.readline(CHUNK_CHARS)


def file_chunks(path: Path) -> Iterator[str]:
    """A UTF-8 file's text in line-ending chunks, exactly as stored (newline="" keeps \\r\\n)."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            yield from line_chunks(handle)
    except UnicodeDecodeError as exc:
        with open(path, "rb") as handle:
            binary = b"\0" in handle.read(SNIFF_BYTES)
        if binary:  # NUL bytes: an archive, an image, a database... not text in some other encoding
            raise UserError(
                f"input {path} is a binary file, not text: pass a text file (a dataset file goes to --dataset)"
            ) from None
        raise UserError(
            f"input {path} is not UTF-8 text ({exc.reason}): convert it first, "
            f"e.g. iconv -f latin1 -t utf-8 {path} > {Path(path).stem}.utf8.txt"
        ) from None
    except OSError as exc:
        raise UserError(f"cannot read input {path}: {exc.strerror or exc}") from None


def label_splits(chunks: Iterable[str], train_chars: int) -> Iterator[tuple[str, str]]:
    """("train" | "val", text) pieces: the first `train_chars` characters are train, the rest val."""
    position = 0
    for chunk in chunks:
        cut = min(max(train_chars - position, 0), len(chunk))
        if cut:
            yield "train", chunk[:cut]
        if cut < len(chunk):
            yield "val", chunk[cut:]
        position += len(chunk)
