"""`tinylm push`: upload an exported model folder to the Hugging Face Hub.

    tinylm push exported/NAME --repo-id user/name [--private] [--revision BRANCH]
                [--commit-message TEXT] [--base-model ID] [--dry-run]

The folder must be a `tinylm export` folder, and it is loaded back with
transformers before anything is sent. Its README.md is uploaded as rendered for
the repo (`model_card.card_for_repo`: the title and the usage snippet name the repo
id, and --base-model names the Hub model it was fine-tuned from); the folder
itself is not changed. A card that states no license gets a warning, not a
refusal. The token comes from `HF_TOKEN` or the stored login (`hf auth login`)
and is never printed. `--dry-run` lists the files that would be uploaded and
validates the folder without touching the network.
`HF_ENDPOINT` points the client at another Hub (huggingface_hub reads it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token

# HTTPError is the base class of the HTTP client huggingface_hub uses (httpx in 1.x, httpx2 in 2.x).
from huggingface_hub.errors import HfHubHTTPError, HTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import (
    DEFAULT_IGNORE_PATTERNS,
    HFValidationError,
    filter_repo_objects,
    validate_repo_id,
)
from transformers.utils import logging as hf_logging

from . import startup
from .errors import UserError, run_cli
from .export import REQUIRED_FILES, add_base_model_argument, check_loads, format_size, is_export_folder
from .model_card import CARD_NAME, card_for_repo

# What each refusal from the Hub most likely means, and what to do about it.
HTTP_HINTS = {
    401: "the token was rejected: set a valid HF_TOKEN or run `hf auth login` again",
    403: "the token may not write there: use a token with write access, or a namespace you own",
    404: "the repo or branch was not found: check --repo-id and --revision",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tinylm push",
        description="Upload a folder written by `tinylm export` to the Hugging Face Hub "
        "(see docs/export-and-deployment.md).",
    )
    parser.add_argument("folder", help="the exported model folder, e.g. exported/my-model")
    parser.add_argument("--repo-id", required=True, help="the Hub repo to push to, e.g. your-name/my-model")
    parser.add_argument("--private", action="store_true",
                        help="create the repo as private (if it does not exist yet)")
    parser.add_argument("--revision", help="branch to push to (created from main if missing; default: main)")
    parser.add_argument("--commit-message", help="commit message (default: 'Upload FOLDER with tinylm')")
    parser.add_argument("--dry-run", action="store_true",
                        help="list what would be uploaded and validate the folder; no network access")
    add_base_model_argument(parser)
    args = parser.parse_args(argv)

    hf_logging.disable_progress_bar()  # transformers' bars while validating only clutter the file list
    folder = Path(args.folder)
    token = None if args.dry_run else require_token()  # fail fast, before loading the model
    files = upload_plan(folder, args.repo_id, args.base_model)
    for name, size in files:
        print(f"  {name:<24} {format_size(size):>10}")
    total = format_size(sum(size for _, size in files))
    target = args.repo_id + (f" (branch {args.revision})" if args.revision else "")
    if args.dry_run:
        token_state = "found" if get_token() else "not found: set HF_TOKEN or run `hf auth login` before pushing"
        print(f"dry run: {len(files)} files ({total}) would be uploaded to {target}; "
              f"the folder loads with transformers; token {token_state}; nothing was sent")
        return 0
    url = upload(folder, args.repo_id, [name for name, _ in files], token, private=args.private,
                 revision=args.revision, commit_message=args.commit_message, base_model=args.base_model)
    print(f"uploaded {len(files)} files ({total}) to {target}: {url}")
    return 0


def upload_plan(folder: Path, repo_id: str, base_model: str | None = None) -> list[tuple[str, int]]:
    """(path in repo, size) of every file that would be uploaded, after checking folder and repo id."""
    check_repo_id(repo_id)
    if not is_export_folder(folder):
        what = "does not exist" if not folder.exists() else "is not a folder written by tinylm export"
        raise UserError(
            f"{folder} {what} (an export holds {', '.join(REQUIRED_FILES)}); "
            f"create one with: tinylm export --checkpoint CHECKPOINT --out {folder}"
        )
    check_loads(folder)
    card = card_for_repo(folder, repo_id, base_model)
    if card is None:
        print(f"warning: {folder} has no {CARD_NAME} model card; export again to get one", file=sys.stderr)
    elif not card.data.license:
        print(f"warning: the model card of {folder} states no license, so others cannot tell whether they may "
              "use the model; set [hub] license in the training config or pass --license to tinylm export "
              "(e.g. mit, apache-2.0), then export again", file=sys.stderr)
    paths = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    return [(name, len(str(card).encode()) if name == CARD_NAME and card else (folder / name).stat().st_size)
            for name in filter_repo_objects(paths, ignore_patterns=DEFAULT_IGNORE_PATTERNS)]


def check_repo_id(repo_id: str, name: str = "--repo-id") -> None:
    """Refuse a malformed repo id (given as flag or key `name`) before any network access."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserError(
            f"{name} {repo_id!r} is not a valid Hub repo id ({exc}); use e.g. your-name/my-model"
        ) from None
    if "/" not in repo_id:
        raise UserError(
            f"{name} {repo_id!r} needs a namespace: your user or organisation name, e.g. your-name/{repo_id}"
        )


def require_token(token: str | None = None) -> str:
    """`token`, else HF_TOKEN, else the stored login; `UserError` when there is none."""
    token = token or get_token()
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again")
    return token


def check_run_push(hub) -> str | None:
    """Before a run that pushes at its end ([hub] repo_id): a malformed repo id or no token fails now,
    not after hours of training. Returns a warning when the card will state no license."""
    check_repo_id(hub.repo_id, name="hub.repo_id")
    require_token()
    if not hub.license:
        return (f"warning: hub.license is not set, so the model card pushed to {hub.repo_id} at the end will "
                "state no license; set [hub] license (e.g. \"mit\", \"apache-2.0\")")
    return None


def push_run(checkpoint_path: Path, export_dir: Path, hub) -> str:
    """Export a finished run's `checkpoint_path` to `export_dir` (replacing an earlier export of the run)
    and upload it to hub.repo_id; return what was done, as one line."""
    from .export import export

    folder = export(checkpoint_path, export_dir, force=True)
    url = push_folder(folder, hub.repo_id, private=hub.private)
    return f"pushed {checkpoint_path} (exported to {folder}) to {hub.repo_id}: {url}"


def push_folder(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    base_model: str | None = None,
) -> str:
    """Check the export `folder`, create `repo_id` if needed and upload the folder; return the commit URL.

    The token defaults to `HF_TOKEN` or the stored login. For calling from code,
    e.g. at the end of training; `tinylm push` does the same.
    """
    token = require_token(token)
    folder = Path(folder)
    files = [name for name, _ in upload_plan(folder, repo_id, base_model)]
    return upload(folder, repo_id, files, token, private=private, revision=revision, commit_message=commit_message,
                  base_model=base_model)


def upload(
    folder: Path,
    repo_id: str,
    files: list[str],
    token: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    base_model: str | None = None,
) -> str:
    """Create the repo (and branch) if missing and upload `files` of `folder`; return the commit URL.

    README.md is sent as `card_for_repo` renders it for `repo_id` (and `base_model`), every other file as on disk.
    """
    card = card_for_repo(folder, repo_id, base_model)
    operations = [
        CommitOperationAdd(path_in_repo=name,
                           path_or_fileobj=str(card).encode() if name == CARD_NAME and card else folder / name)
        for name in files
    ]
    api = HfApi(token=token)
    try:
        # private=None, not False, leaves the visibility to the Hub: an organisation may default to private.
        api.create_repo(repo_id, private=private or None, repo_type="model", exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        commit = api.create_commit(
            repo_id=repo_id,
            operations=operations,  # exactly the files `upload_plan` listed
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload {folder.resolve().name} with tinylm",
        )
    except OfflineModeIsEnabled:
        raise UserError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it, or use --dry-run") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        hint = HTTP_HINTS.get(status, str(exc).strip().splitlines()[0][:300])
        raise UserError(f"the Hub refused the push to {repo_id} (HTTP {status}): {hint}") from None
    except ValueError as exc:  # the Hub's check of the card's metadata (validate-yaml) failed
        reason = " ".join(str(exc).split())[:300]
        raise UserError(f"the Hub refused the push to {repo_id}: {reason}") from None
    except HTTPError as exc:  # no answer at all: refused, timed out, DNS, TLS
        raise UserError(
            f"cannot reach the Hub at {constants.ENDPOINT} ({type(exc).__name__}: {exc}); "
            "check your connection (and HF_ENDPOINT if you set it), then push again"
        ) from None
    return commit.commit_url


if __name__ == "__main__":
    startup.command_process()
    sys.exit(run_cli(main))
