"""The Hub as a run's home: with `[hub] push_checkpoints = true` a run keeps its files on the branch
`checkpoints` of `[hub] repo_id` as it trains, and `tinylm train --resume OWNER/NAME[@REVISION]` brings
them back, on any machine.

Pushing (`HubPusher`, main process). After each save `run_writer` hands over the run's files:
ckpt_last.pt and ckpt_best.pt when they changed since the last push that got through, under FSDP
the folders of optimizer shards they name (`tinylm.shards`) when not pushed yet, and always
train_log.json and metrics.jsonl. They are staged at once in out_dir/.hub-uploads (hard links to the
checkpoints and the shards, which later saves replace with new files and never rewrite; a copy of the
logs) and one background thread uploads them, one commit per evaluation, so no step waits for the
network. At
most one upload runs at a time: an evaluation that finds one running leaves its files to go next, in
place of any older ones still waiting (an older state is worth nothing once a newer one is there, and
the upload already running goes on: it may be the last to get through before a preemption). A failed
upload is tried again (`RETRY_DELAYS_S`) when the failure may pass, then reported in one warning line;
training goes on, and the next evaluation pushes everything not pushed yet. Each commit leaves the
branch holding the run's files and no other run's (a `ckpt_best.pt` the run does not have, a shards
folder no checkpoint names any more, are deleted), so a commit's checkpoints and their shards go together;
earlier commits stay in the branch's history, so an earlier evaluation resumes as `OWNER/NAME@COMMIT`.
At its end the run waits for its last upload.

Nothing pushed names a path of the user's machine (`public_config`, `public_payload`): a relative
path is kept (it names a place in the project, the same on any machine, so the run resumes there
without flags) and an absolute one, or one through `~` or `..`, becomes its base name, as in the
model card.

Resuming (`fetch_run`): the files of one commit go to the Hugging Face cache, then the main process
copies them into the run's out_dir (the --out-dir flag, else the --config file's out_dir, else the
run's own), which must not hold another run unless --overwrite; from there the run resumes as from a
local checkpoint, and goes on pushing to the same branch. The other processes read the checkpoint from
their cache and, under FSDP, the shards from out_dir, which every process shares (`shards.check_shared`).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable

from . import checkpoint, run_folder, shards
from .atomic import atomic_path, replace_folder, write_json
from .errors import UserError, command_line
from .hub_names import hub_id, is_local
from .paths import BEST_NAME, HUB_CHECKPOINTS_BRANCH, LAST_NAME, METRICS_NAME, SHARDS_PREFIX, TRAIN_LOG_NAME

CHECKPOINT_NAMES = (LAST_NAME, BEST_NAME)
# The config keys that may hold a path of the user's machine.
PATH_KEYS = (("model", "init_from"), ("data", "processed_dir"), ("training", "out_dir"))
# Seconds before each new try of an upload that failed in a way that may pass (the Hub busy or
# unreachable for a moment): three tries in all, then a warning; the next evaluation tries again anyway.
RETRY_DELAYS_S = (10.0, 60.0)
# HTTP answers worth another try; any other refusal (a bad token, a repo we may not write) is reported at once.
TRANSIENT_STATUSES = (408, 429, 500, 502, 503, 504)


# --- what is pushed names no path of the user's machine ---------------------------------------------

def public_path(value: Any) -> Any:
    """A path as pushed: a relative one as it is, an absolute one (or through `~` or `..`) by its base name."""
    if not isinstance(value, str):
        return value
    posix, windows = PurePosixPath(value), PureWindowsPath(value)
    if posix.is_absolute() or windows.is_absolute() or value.startswith("~") or ".." in windows.parts:
        return windows.name  # PureWindowsPath splits at "/" and "\\" alike
    return value


def public_values(value: Any) -> Any:
    """Every string in `value` (nested dicts and lists) through `public_path`."""
    if isinstance(value, dict):
        return {key: public_values(item) for key, item in value.items()}
    if isinstance(value, list):
        return [public_values(item) for item in value]
    return public_path(value)


def public_config(config: dict) -> dict:
    """A run's `Config.to_dict()` with its paths made public (`PATH_KEYS`; other strings, a prompt, stay)."""
    public = {section: dict(values) for section, values in config.items()}
    for section, key in PATH_KEYS:
        if key in public.get(section, {}):
            public[section][key] = public_path(public[section][key])
    return public


def public_payload(payload: dict) -> dict:
    """A checkpoint as pushed: its config, its tokenizer's path and its data's sources made public."""
    meta = payload.get("meta") or {}
    return {**payload, "config": public_config(payload["config"]),
            "tokenizer": {**payload["tokenizer"], "path": public_path(payload["tokenizer"].get("path"))},
            "meta": {key: public_values(value) if key in ("source", "tokenizer_from") else value
                     for key, value in meta.items()}}


# --- pushing, in the background ---------------------------------------------------------------------

@dataclass
class Upload:
    """One save's files, staged in `folder` for one commit."""

    iter: int
    folder: Path
    ended: str | None  # the stop reason, when this is the end of the run (train_log.json's summary)
    identities: dict[str, tuple]  # checkpoint or shards folder staged -> the identity of it in out_dir
    names: list[str]  # every file and folder staged, as named at the top of the repo
    held: frozenset[str]  # the run files and shards folders out_dir held: the branch keeps no other

    @property
    def what(self) -> str:
        return f"the end of the run (iter {self.iter})" if self.ended else f"iter {self.iter}"


@dataclass
class Outcome:
    """How the upload of `what` ("iter 8", "the end of the run (iter 12)") ended: pushed (`commit`), or not."""

    what: str
    commit: str | None = None
    reason: str | None = None
    tries: int = 1


def file_identity(path: Path) -> tuple:
    """What tells one write of a file from the next: every save makes a new file (atomic_path)."""
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def link_or_copy(source: Path | str, target: Path | str) -> None:
    """A hard link (instant, no space) where the filesystem has them, else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def run_entry(path_in_repo: str) -> str | None:
    """The run file or shards folder a file of the repo belongs to (None: not a run's, a README, say)."""
    top, _, inside = path_in_repo.partition("/")
    is_run_file = not inside and top in run_folder.RUN_FILES
    in_shards_folder = bool(inside) and top.startswith(SHARDS_PREFIX)
    return top if is_run_file or in_shards_folder else None


def files_under(folder: Path, name: str) -> list[tuple[str, Path]]:
    """(path in the repo, file) of the staged file or folder `name` in `folder`."""
    path = folder / name
    if not path.is_dir():
        return [(name, path)]
    return [(f"{name}/{file.relative_to(path).as_posix()}", file) for file in sorted(path.rglob("*")) if file.is_file()]


def failure_reason(exc: Exception) -> str:
    """Why a call to the Hub failed, in a few words."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, HTTPError, OfflineModeIsEnabled

    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        return f"HTTP {status}: {str(exc).strip().splitlines()[0][:200]}"
    if isinstance(exc, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set"
    if isinstance(exc, HTTPError):
        return f"cannot reach the Hub at {constants.ENDPOINT} ({type(exc).__name__}: {exc})"
    return f"{type(exc).__name__}: {exc}"


def transient(exc: Exception) -> bool:
    """Whether another try may get through: the Hub busy or failing, or not reached; not a refusal."""
    from huggingface_hub.errors import HfHubHTTPError, HTTPError, OfflineModeIsEnabled

    if isinstance(exc, HfHubHTTPError):
        return exc.response is None or exc.response.status_code in TRANSIENT_STATUSES
    return isinstance(exc, HTTPError) and not isinstance(exc, OfflineModeIsEnabled)


class HubPusher:
    """Pushes a run's files to branch `checkpoints` of `hub.repo_id` in the background (main process).

    `push` stages and returns at once; `report` prints what the uploads did since; `close` waits for
    the last one. The token is `HF_TOKEN` or the stored login (checked before training starts).
    """

    def __init__(self, hub, out_dir: Path):
        from huggingface_hub import HfApi

        self.api = HfApi()
        self.repo_id, self.private = hub.repo_id, hub.private
        self.out_dir = out_dir
        self.uploads = out_dir / run_folder.HUB_UPLOADS
        self.target = f"{hub.repo_id} (branch {HUB_CHECKPOINTS_BRANCH})"
        self._changed = threading.Condition()
        self._waiting: Upload | None = None
        self._running: Upload | None = None
        self._outcomes: list[Outcome] = []
        self._notes: list[str] = []
        self._pushed: dict[str, tuple] = {}  # checkpoint -> identity of the file its last good push sent
        self._on_branch: set[str] | None = None  # the run files the branch holds, once asked (worker only)
        self._staged = 0
        self._last: Outcome | None = None
        threading.Thread(target=self._work, name="tinylm-hub-push", daemon=True).start()

    def push(self, step: int, train_log: dict) -> None:
        """Stage the run's files as just saved at `step` and leave them to the background thread.

        Holds the lock while staging (a link and two small copies), which the background thread
        takes only between uploads: this never waits for the network."""
        with self._changed:
            try:
                upload = self._stage(step, train_log)
            except (OSError, UserError) as exc:
                self._notes.append(f"warning: iter {step} is not pushed to {self.target}: its files could not be "
                                   f"staged in {self.uploads} ({exc}); training goes on")
                return
            replaced, self._waiting = self._waiting, upload
            self._changed.notify_all()
        if replaced is not None:
            shutil.rmtree(replaced.folder, ignore_errors=True)
        if replaced is not None and replaced.iter != step:  # the end of a run saves its step's log again
            self._notes.append(f"note: iter {replaced.iter} is not pushed to {self.target}: the upload before it "
                               f"was still running, and iter {step} goes next in its place")

    def report(self, say: Callable[[str], None], *, final: bool = False) -> None:
        """Say what happened since the last report: each upload's outcome, each state skipped."""
        with self._changed:
            outcomes, self._outcomes = self._outcomes, []
        notes, self._notes = self._notes, []
        for line in notes:
            say(line)
        for outcome in outcomes:
            if outcome.commit:
                say(f"pushed {outcome.what} to {self.target}: commit {outcome.commit[:7]}")
                continue
            last = final and outcome is self._last  # nothing after it will push the run's files
            after = f"the run's latest files are only in {self.out_dir}" if last else \
                "training goes on, and the next evaluation pushes again"
            say(f"warning: pushing {outcome.what} to {self.target} failed"
                + (f" after {outcome.tries} tries" if outcome.tries > 1 else "") + f" ({outcome.reason}); {after}")

    def close(self, say: Callable[[str], None]) -> None:
        """Wait for the uploads still to go (the run's last state), report them, remove the staged files."""
        with self._changed:
            busy = self._running or self._waiting
            if busy:
                say(f"waiting for the upload of iter {(self._waiting or busy).iter} to {self.target}...")
            while self._running or self._waiting:
                self._changed.wait()
        self.report(say, final=True)
        shutil.rmtree(self.uploads, ignore_errors=True)
        if self._last is not None and self._last.commit:
            say(f"the run's files are on {self.target}; resume it on any machine with "
                f"`{command_line('tinylm', 'train', '--resume', self.repo_id)}`")

    # ---------------------------------------------------------------- main thread: staging

    def _stage(self, step: int, train_log: dict) -> Upload:
        """The files to push now (call it holding the lock): the checkpoints neither pushed nor being pushed."""
        self._staged += 1
        folder = self.uploads / str(self._staged)
        folder.mkdir(parents=True)
        covered = {**self._pushed, **(self._running.identities if self._running else {})}
        identities = {}
        for name in CHECKPOINT_NAMES:
            source = self.out_dir / name
            if source.is_file() and file_identity(source) != covered.get(name):
                identities[name] = file_identity(source)
                link_or_copy(source, folder / name)  # made public by the worker
        # Under FSDP, the folders the checkpoints name (a save removed the others): each save writes a
        # new one, under a new name, so a folder pushed once is never pushed again.
        held_shards = [source.name for source in shards.all_folders(self.out_dir)]
        for name in held_shards:
            if name not in covered:
                identities[name] = (name,)
                shutil.copytree(self.out_dir / name, folder / name, copy_function=link_or_copy)
        write_json(folder / TRAIN_LOG_NAME, {**train_log, "config": public_config(train_log["config"])})
        names = [*identities, TRAIN_LOG_NAME]
        if (self.out_dir / METRICS_NAME).is_file():  # appended to in place: copied, not linked
            shutil.copyfile(self.out_dir / METRICS_NAME, folder / METRICS_NAME)
            names.append(METRICS_NAME)
        held = frozenset(name for name in run_folder.RUN_FILES if (self.out_dir / name).is_file()) | set(held_shards)
        summary = train_log.get("summary")
        return Upload(step, folder, summary and summary["stop_reason"], identities, names, held)

    # ---------------------------------------------------------------- the background thread

    def _work(self) -> None:
        while True:
            with self._changed:
                while self._waiting is None:
                    self._changed.wait()
                upload, self._waiting = self._waiting, None
                self._running = upload
            outcome = self._upload(upload)
            with self._changed:
                if outcome.commit:
                    self._pushed.update(upload.identities)
                elif self._waiting is not None:
                    self._hand_on(upload, self._waiting)
                self._outcomes.append(outcome)
                self._last, self._running = outcome, None
                self._changed.notify_all()
            shutil.rmtree(upload.folder, ignore_errors=True)

    def _hand_on(self, failed: Upload, waiting: Upload) -> None:
        """Give the upload waiting the checkpoints (and shards) of one that failed, which it left out as
        being pushed (what out_dir still holds and the waiting one did not stage is unchanged since)."""
        for name, identity in failed.identities.items():
            if name not in waiting.identities and name in waiting.held and (failed.folder / name).exists():
                os.replace(failed.folder / name, waiting.folder / name)
                waiting.identities[name] = identity
                waiting.names.insert(0, name)

    def _upload(self, upload: Upload) -> Outcome:
        """Make the staged checkpoints public, then commit, trying again while a failure may pass.
        Every failure becomes an `Outcome`: nothing this thread meets may stop training."""
        try:
            for name in upload.identities.keys() & set(CHECKPOINT_NAMES):  # shards hold tensors by parameter name
                checkpoint.save(upload.folder / name, public_payload(checkpoint.load(upload.folder / name)))
        except Exception as exc:  # noqa: BLE001 - reported, never raised into training
            return Outcome(upload.what, reason=f"cannot prepare its checkpoint: {exc}")
        for tries, delay in enumerate((*RETRY_DELAYS_S, None), start=1):  # the last try returns, whatever happens
            try:
                return Outcome(upload.what, commit=self._commit(upload), tries=tries)
            except Exception as exc:  # noqa: BLE001 - reported, never raised into training
                if delay is None or not transient(exc):
                    return Outcome(upload.what, reason=failure_reason(exc), tries=tries)
                time.sleep(delay)

    def _commit(self, upload: Upload) -> str:
        """One commit on the branch: the staged files, and the deletion of the run files and shards folders
        the run no longer has."""
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        if self._on_branch is None:
            # private=None, not False, leaves the visibility to the Hub (see push.upload).
            self.api.create_repo(self.repo_id, private=self.private or None, exist_ok=True)
            self.api.create_branch(self.repo_id, branch=HUB_CHECKPOINTS_BRANCH, exist_ok=True)
            info = self.api.repo_info(self.repo_id, revision=HUB_CHECKPOINTS_BRANCH)
            self._on_branch = {sibling.rfilename for sibling in info.siblings or [] if run_entry(sibling.rfilename)}
        added = [item for name in upload.names for item in files_under(upload.folder, name)]
        kept = upload.held | set(upload.names)
        gone = sorted(path for path in self._on_branch if run_entry(path) not in kept)
        operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=file) for path, file in added] + \
                     [CommitOperationDelete(path_in_repo=path) for path in gone]
        message = f"tinylm: iter {upload.iter}" + (f": the run ended ({upload.ended})" if upload.ended else "")
        commit = self.api.create_commit(self.repo_id, operations, commit_message=message,
                                        revision=HUB_CHECKPOINTS_BRANCH)
        self._on_branch = (self._on_branch - set(gone)) | {path for path, _ in added}
        return commit.oid


# --- resuming from the Hub --------------------------------------------------------------------------

def resume_target(name: str) -> tuple[str, str] | None:
    """(repo id, revision) when `--resume NAME` names a run on the Hub, `OWNER/NAME[@REVISION]` (revision:
    the checkpoints branch unless given); None for a checkpoint file here, or a missing one named like a file."""
    if is_local(name) or name.endswith(".pt"):
        return None
    repo, _, revision = name.partition("@")
    if "/" not in repo or hub_id(repo) is None:  # a run is pushed to OWNER/NAME (push.check_repo_id)
        return None
    return repo, revision or HUB_CHECKPOINTS_BRANCH


def fetch_run(repo_id: str, revision: str, out_dir_for: Callable[[str], Path], *,
              overwrite: bool) -> tuple[Path, Path]:
    """Bring the run on `repo_id` at `revision` into its out_dir, `out_dir_for(the run's own out_dir)`.

    Returns (the ckpt_last.pt to load, the path the run resumes as: <out_dir>/ckpt_last.pt). Every
    process downloads (the Hugging Face cache is safe to share, and each machine of several has its
    own); the main one, told by the launcher's environment (no process group exists yet), copies the
    files into out_dir, and the others load the checkpoint from their cache.
    """
    from accelerate.utils import get_cpu_distributed_information

    files, commit = download(repo_id, revision)
    where = f"{repo_id}@{revision}"
    resume_as = out_dir_for(read_out_dir(files[TRAIN_LOG_NAME], where)) / LAST_NAME
    if get_cpu_distributed_information().rank != 0:
        return files[LAST_NAME], resume_as
    copy_run(files, resume_as.parent, overwrite=overwrite)
    entries = dict.fromkeys(run_entry(name) + ("/" if "/" in name else "") for name in files)
    print(f"fetched {where} (commit {commit[:7]}) into {resume_as.parent}: {', '.join(entries)}", flush=True)
    return resume_as, resume_as


def download(repo_id: str, revision: str) -> tuple[dict[str, Path], str]:
    """The run files (and shards folders) of the commit `revision` names, downloaded to the Hugging Face
    cache, and that commit."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}"
    try:
        info = HfApi().repo_info(repo_id, revision=revision)
        names = {sibling.rfilename for sibling in info.siblings or []}
        missing = [name for name in (LAST_NAME, TRAIN_LOG_NAME) if name not in names]
        if missing:
            raise UserError(f"--resume {where}: that revision holds no {' or '.join(missing)}; a run with "
                            f"[hub] push_checkpoints = true keeps its files on branch {HUB_CHECKPOINTS_BRANCH} "
                            f"(--resume {repo_id}), each evaluation a commit (--resume {repo_id}@COMMIT)")
        wanted = [name for name in run_folder.RUN_FILES if name in names] + \
            sorted(name for name in names if "/" in name and run_entry(name))  # the shards folders' files
        files = {name: Path(hf_hub_download(repo_id, name, revision=info.sha)) for name in wanted}
    except RepositoryNotFoundError:
        raise UserError(f"--resume {where}: no checkpoint file of that name here, and no Hub repo {repo_id} this "
                        "token can read; check the name (and HF_TOKEN for a private repo)") from None
    except RevisionNotFoundError:
        raise UserError(f"--resume {where}: {repo_id} has no revision {revision!r}; a run with "
                        f"[hub] push_checkpoints = true pushes to branch {HUB_CHECKPOINTS_BRANCH}") from None
    except (HfHubHTTPError, HTTPError, OfflineModeIsEnabled, LocalEntryNotFoundError) as exc:
        raise UserError(f"--resume {where}: cannot fetch the run ({failure_reason(exc)})") from None
    return files, info.sha


def read_out_dir(train_log: Path, where: str) -> str:
    """The run's own out_dir, as its train_log.json on the Hub names it."""
    try:
        return json.loads(train_log.read_text(encoding="utf-8"))["config"]["training"]["out_dir"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"--resume {where}: its {TRAIN_LOG_NAME} is not one tinylm wrote (no config.training."
                        "out_dir); resume from another revision") from None


def copy_run(files: dict[str, Path], out_dir: Path, *, overwrite: bool) -> None:
    """Copy the fetched `files` into `out_dir`, holding its lock; a run already there is refused
    (`run_folder.refuse_other_run`), or with `overwrite` removed first. The shards folders go first,
    each whole (staged, then renamed), so a checkpoint copied never names a folder not there."""
    run_folder.check_writable(out_dir)
    with run_folder.lock(out_dir):
        found = run_folder.other_run(out_dir, resumed_from=None)
        if found and not overwrite:
            run_folder.refuse_other_run(out_dir, found)
        run_folder.clear_replaced_run(out_dir)
        for folder in dict.fromkeys(name.split("/")[0] for name in files if "/" in name):
            staging = shards.staging_folder(out_dir, f"{folder}.")
            for name, source in files.items():
                if name.startswith(f"{folder}/"):
                    target = staging / name.removeprefix(f"{folder}/")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, target)
            replace_folder(staging, out_dir / folder)
        for name, source in files.items():
            if "/" not in name:
                with atomic_path(out_dir / name) as tmp:
                    shutil.copyfile(source, tmp)
