"""`tinylm push`: dry runs offline, clear refusals, and a real upload through huggingface_hub's client.

No test talks to the real Hub. The upload test points HF_ENDPOINT at `FakeHub` (tests/fake_hub.py),
a small HTTP server on 127.0.0.1 that stands in for the Hub API routes an upload of a small folder
uses (create repo, create branch, validate the card's YAML, preupload, commit). It answers every file
as a "regular" upload, so the file bytes travel base64-encoded in the commit; the real Hub would
send model.safetensors through its Xet/LFS storage instead, which this test does not exercise.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE once, at import: the tests about those
settings (a stored login or none, offline mode, the endpoint a user sets) run `tinylm push` in a fresh
process. The refusals and dry runs that need none of them, and the uploads that only need the FakeHub
(`hub_here`), run in this process.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import FakeHub, serve
from helpers_checkpoint import assert_one_line_error, tiny_checkpoint
from huggingface_hub import ModelCard, constants
from training_helpers import cli_here

from tinylm import checkpoint, export, model_card, push

TOKEN = "hf_tinylmTestTokenNeverPrinted0123"
pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


def licensed_checkpoint(path: Path, **payload_values) -> Path:
    """The tiny checkpoint, trained with `[hub] license = "mit"` (so push has nothing to warn about)."""
    payload = checkpoint.load(tiny_checkpoint(path))
    payload["config"]["hub"]["license"] = "mit"
    checkpoint.save(path, {**payload, **payload_values})
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    ckpt = licensed_checkpoint(tmp_path_factory.mktemp("checkpoints") / "ckpt_best.pt")
    return export.export(ckpt, tmp_path_factory.mktemp("exported") / "tiny")


def run_push(*args, tmp_path: Path, token: str | None = TOKEN, **env_vars: str) -> subprocess.CompletedProcess:
    """`tinylm push ARGS` with a private HF_HOME (so no stored login) and HF_TOKEN = `token`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1", **env_vars)
    if token:
        env["HF_TOKEN"] = token
    result = subprocess.run([sys.executable, "-m", "tinylm.push", *map(str, args)], capture_output=True, text=True,
                            timeout=300, env=env)
    assert TOKEN not in result.stdout + result.stderr
    return result


def push_here(capsys, *args) -> subprocess.CompletedProcess:
    """`tinylm push ARGS` in this process (`cli_here`)."""
    result = cli_here(push.main, list(args), capsys)
    assert TOKEN not in result.stdout + result.stderr
    return result


@pytest.fixture
def offline_here(monkeypatch):
    """This process's huggingface_hub offline, as HF_HUB_OFFLINE=1 makes a fresh one (it is read at import, into
    `constants.HF_HUB_OFFLINE`, which every request checks): a dry run that sent anything would fail."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- dry run and refusals: no network ---------------------------------------------------------------

def test_dry_run_lists_every_file_with_its_size_and_sends_nothing(exported, tmp_path):
    # HF_HUB_OFFLINE makes any Hub request fail, so success proves no network was needed.
    result = run_push(exported, "--repo-id", "someone/tiny", "--dry-run", tmp_path=tmp_path, token=None,
                      HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    files = sorted(path for path in exported.iterdir())
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert listed == [path.name for path in files]
    card_size = len(str(model_card.card_for_repo(exported, "someone/tiny")).encode())  # the card as uploaded
    for path in files:
        size = card_size if path.name == "README.md" else path.stat().st_size
        assert any(line.split()[0] == path.name and export.format_size(size) in line
                   for line in result.stdout.splitlines() if line.startswith("  "))
    summary = result.stdout.strip().splitlines()[-1]
    assert f"{len(files)} files" in summary and "someone/tiny" in summary and "nothing was sent" in summary
    assert "token not found" in summary


def test_pushing_a_folder_that_is_not_an_export_is_refused(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    assert_one_line_error(push_here(capsys, folder, "--repo-id", "someone/tiny", "--dry-run"),
                          str(folder), "not a folder written by tinylm export")
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # read when asked for: a push without --dry-run gets that far
    assert_one_line_error(push_here(capsys, tmp_path / "nowhere", "--repo-id", "someone/tiny"), "does not exist")


def test_a_broken_export_fails_validation(exported, tmp_path, capsys):
    broken = shutil.copytree(exported, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    assert_one_line_error(push_here(capsys, broken, "--repo-id", "someone/tiny", "--dry-run"),
                          "does not load with transformers")


@pytest.mark.parametrize("repo_id, needle", [("not a repo!", "not a valid Hub repo id"), ("tiny", "needs a namespace")])
def test_invalid_repo_id_is_refused_before_any_network(exported, capsys, offline_here, repo_id, needle):
    assert_one_line_error(push_here(capsys, exported, "--repo-id", repo_id, "--dry-run"), needle)


def test_missing_token_is_one_clear_line(exported, tmp_path):
    assert_one_line_error(run_push(exported, "--repo-id", "someone/tiny", tmp_path=tmp_path, token=None),
                          "no Hugging Face token", "HF_TOKEN")


def test_unreachable_hub_is_one_clear_line(exported, tmp_path):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    result = run_push(exported, "--repo-id", "someone/tiny", tmp_path=tmp_path, HF_ENDPOINT=endpoint)
    assert_one_line_error(result, "cannot reach the Hub", endpoint)


# --- a real upload through huggingface_hub, against a stand-in for the Hub's API --------------------

@pytest.fixture
def fake_hub():
    with serve() as url:
        yield url


@pytest.fixture
def hub_here(fake_hub, monkeypatch):
    """This process's huggingface_hub pointed at the FakeHub, online, with HF_TOKEN set: what HF_ENDPOINT gives a
    fresh process. `HfApi()` takes its endpoint from `constants.ENDPOINT` (HF_ENDPOINT, read at import) when it
    is made, and every request checks `constants.HF_HUB_OFFLINE`; HF_TOKEN is read when a token is asked for.
    A request that went anywhere else would fail (no network) or not show in `FakeHub.requests`."""
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return fake_hub


def test_push_creates_the_repo_and_uploads_every_file(exported, tmp_path, fake_hub):
    result = run_push(exported, "--repo-id", "someone/tiny", "--private", "--revision", "dev",
                      "--commit-message", "first model", tmp_path=tmp_path, HF_ENDPOINT=fake_hub)
    assert result.returncode == 0, result.stderr
    assert "uploaded 6 files" in result.stdout and "someone/tiny (branch dev)" in result.stdout

    by_route = {path.split("?")[0]: (auth, body) for path, auth, body in FakeHub.requests}
    assert all(auth == f"Bearer {TOKEN}" for auth, _ in by_route.values())
    create = by_route["/api/repos/create"][1]
    assert (create["organization"], create["name"], create["visibility"]) == ("someone", "tiny", "private")
    assert "/api/models/someone/tiny/branch/dev" in by_route

    commit = by_route["/api/models/someone/tiny/commit/dev"][1]
    assert commit[0] == {"key": "header", "value": {"summary": "first model", "description": ""}}
    uploaded = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in commit[1:]}
    on_disk = {path.name: path.read_bytes() for path in exported.iterdir()}
    assert uploaded.keys() == on_disk.keys()
    assert uploaded["README.md"] == str(model_card.card_for_repo(exported, "someone/tiny")).encode()
    assert {n: b for n, b in uploaded.items() if n != "README.md"} == {n: b for n, b in on_disk.items() if n != "README.md"}


def test_rejected_token_is_one_clear_line(exported, hub_here, capsys):
    FakeHub.refuse_with = 401
    assert_one_line_error(push_here(capsys, exported, "--repo-id", "someone/tiny"), "HTTP 401", "token was rejected")


def test_offline_mode_makes_a_real_push_one_clear_line(exported, tmp_path):
    result = run_push(exported, "--repo-id", "someone/tiny", tmp_path=tmp_path, HF_HUB_OFFLINE="1")
    assert_one_line_error(result, "HF_HUB_OFFLINE")


def test_push_folder_for_callers_uses_the_token_it_is_given(exported, hub_here, monkeypatch):
    # What the training loop would call at the end of a run; no HF_TOKEN in the environment here.
    monkeypatch.delenv("HF_TOKEN")
    url = push.push_folder(exported, "someone/tiny", token=TOKEN, commit_message="from code")
    assert url == f"{hub_here}/someone/tiny/commit/{FakeHub.repos['someone/tiny'].branches['main']}"
    assert {auth for _, auth, _ in FakeHub.requests if auth} == {f"Bearer {TOKEN}"}
    commit = next(body for path, _, body in FakeHub.requests if "/commit/" in path)
    assert commit[0]["value"]["summary"] == "from code"
    # Not private: the visibility is left to the Hub (an organisation may default to private).
    assert "visibility" not in next(body for path, _, body in FakeHub.requests if path == "/api/repos/create")


# --- the model card as pushed -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def licensed(tmp_path_factory) -> Path:
    """An export with a validation loss (so a model-index), in a folder named `exported` as the
    end-of-training push writes it."""
    path = licensed_checkpoint(tmp_path_factory.mktemp("checkpoints") / "ckpt_best.pt", val_loss=1.5)
    return export.export(path, tmp_path_factory.mktemp("run") / "exported")


def test_the_pushed_card_names_the_repo_and_the_folder_keeps_its_own(licensed, hub_here, snapshot, capsys):
    before = snapshot(licensed)
    result = push_here(capsys, licensed, "--repo-id", "someone/renamed-model")
    assert result.returncode == 0, result.stderr
    assert "license" not in result.stderr  # the card states one: no warning
    commit = next(body for path, _, body in FakeHub.requests if "/commit/" in path)
    uploaded = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in commit[1:]}
    card = ModelCard(uploaded["README.md"].decode())
    assert card.text.startswith("\n# renamed-model\n")
    assert 'AutoModelForCausalLM.from_pretrained("someone/renamed-model")' in card.text
    assert 'pipeline("text-generation", model="someone/renamed-model")' in card.text
    assert '"exported"' not in card.text and "Replace `" not in card.text
    local = ModelCard.load(licensed / "README.md")
    # Only the name changed: the metadata (license, model-index values) is the export's.
    assert card.data.model_name == "renamed-model" and local.data.model_name == "exported"
    assert (card.data.license, [r.metric_value for r in card.data.eval_results]) == (
        "mit", [r.metric_value for r in local.data.eval_results])
    assert card.text.split("## How to use")[0].replace("renamed-model", "exported") == \
        local.text.split("## How to use")[0]
    assert snapshot(licensed) == before  # the local README.md still describes the folder
    assert 'from_pretrained("exported")' in (licensed / "README.md").read_text()


def test_a_card_without_a_license_is_pushed_with_a_warning(exported, tmp_path, capsys, offline_here):
    unlicensed = shutil.copytree(exported, tmp_path / "unlicensed")
    card = ModelCard.load(unlicensed / "README.md")
    card.data.license = None  # what an export of a run without [hub] license writes
    card.save(unlicensed / "README.md")
    result = push_here(capsys, unlicensed, "--repo-id", "someone/tiny", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "warning: the model card of" in result.stderr and "states no license" in result.stderr
    assert "--license" in result.stderr


def test_base_model_names_the_hub_model_in_the_pushed_card(tmp_path, hub_here, snapshot, capsys):
    """A model fine-tuned from a local folder: its card names no base model until push's --base-model does."""
    ckpt = tmp_path / "ckpt_best.pt"
    licensed_checkpoint(ckpt)
    payload = checkpoint.load(ckpt)
    payload["config"]["model"]["init_from"] = "/home/me/models/tiny"
    checkpoint.save(ckpt, payload)
    folder = export.export(ckpt, tmp_path / "exported")
    before = snapshot(folder)
    result = push_here(capsys, folder, "--repo-id", "someone/tiny", "--base-model", "openai-community/gpt2")
    assert result.returncode == 0, result.stderr
    commit = next(body for path, _, body in FakeHub.requests if "/commit/" in path)
    uploaded = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in commit[1:]}
    card = ModelCard(uploaded["README.md"].decode())
    link = "[`openai-community/gpt2`](https://huggingface.co/openai-community/gpt2)"
    assert card.data.base_model == "openai-community/gpt2"
    assert f"fine-tuned from {link} with tinylm" in card.text and f"| fine-tuned from | {link} |" in card.text
    assert "local model" not in card.text and "/home/me" not in uploaded["README.md"].decode()
    assert snapshot(folder) == before and ModelCard.load(folder / "README.md").data.base_model is None


def test_base_model_for_a_model_trained_from_scratch_is_one_line(exported, capsys, offline_here):
    result = push_here(capsys, exported, "--repo-id", "someone/tiny", "--base-model", "gpt2", "--dry-run")
    assert_one_line_error(result, "--base-model gpt2", "not fine-tuned")
