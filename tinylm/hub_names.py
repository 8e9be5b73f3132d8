"""Hub id or local path? One rule for every name that may be either: `--model`, `--from`,
`--dataset`, `model.init_from`, and the model card's links to a base model and a dataset.

A name is local when a file or folder of that name exists here (`~` expanded). Otherwise it
is a Hub id when it reads as one: `name` or `owner/name` that huggingface_hub accepts, not
starting with `.`, `/` or `~`, and not ending like a data file. Anything else is a local path
that does not exist, and is reported as one rather than looked up on the Hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub.utils import HFValidationError, validate_repo_id

from .compat import hub_cache_folder

# A name ending like this is a data file, never a Hub id (Hub ids may contain dots).
DATA_FILE_SUFFIXES = (".txt", ".text", ".md", ".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet", ".arrow",
                      ".gz", ".bz2", ".xz", ".zst", ".zip")


def is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


def reads_as_hub_id(name: Any) -> bool:
    """Whether `name` has the form of a Hub repo id (whether or not a local file has that name too)."""
    if not isinstance(name, str) or not name or name.count("/") > 1 or name.startswith((".", "/", "~")):
        return False
    if name.lower().endswith(DATA_FILE_SUFFIXES):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_id(name: Any, local_ok: bool = False) -> str | None:
    """`name` when it reads as a Hub id and (unless `local_ok`) no file or folder of that name is here."""
    return name if reads_as_hub_id(name) and (local_ok or not is_local(name)) else None


def in_hub_cache(repo_id: str, repo_type: str) -> bool:
    """Whether this machine's Hugging Face cache holds the Hub repo `repo_id` ("model" or "dataset").

    Reading a model or dataset by Hub id puts it there and a local folder never does, so this tells
    a Hub id from a relative path that reads like one (`tiny`, `data/saved`) wherever a command
    runs: whether such a folder exists depends on the folder it runs from.
    """
    return hub_cache_folder(repo_id, repo_type).is_dir()
