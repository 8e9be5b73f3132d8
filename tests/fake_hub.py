"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, for huggingface_hub's real client.

It keeps what it is sent: repos with branches and commits of files, so uploads can be read back and
downloaded. Routes: create a repo, create a branch, validate a card's YAML, preupload, commit (file
additions and deletions), a revision's info (its commit and files) and a file's download
(`resolve`, HEAD and GET). Every file is answered as a "regular" upload, so the bytes travel
base64-encoded in the commit; the real Hub's Xet/LFS transfer is not exercised.

Knobs, set on the class by a test: `refuse_with` (answer every POST with that status),
`refuse_commits` (a commit summary -> [status, times]: refuse that many tries of that commit) and
`release` (a `threading.Event`: commits wait until it is set). `most_in_flight` counts the most
commit requests the server held at once.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import unquote, urlsplit


@dataclass
class Commit:
    oid: str
    summary: str
    files: dict[str, bytes]


@dataclass
class Repo:
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # branch -> its last commit's oid
    made_on: dict[str, list[str]] = field(default_factory=dict)  # branch -> the commits made on it, in order

    def add_commit(self, branch: str, summary: str, files: dict[str, bytes]) -> Commit:
        digest = hashlib.sha1(json.dumps([self.branches.get(branch), summary, len(self.commits)]).encode())
        for name in sorted(files):
            digest.update(name.encode() + files[name])
        commit = Commit(digest.hexdigest(), summary, files)
        self.commits[commit.oid] = commit
        self.branches[branch] = commit.oid
        self.made_on.setdefault(branch, []).append(commit.oid)
        return commit

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)

    def history(self, branch: str) -> list[Commit]:
        """The commits made on `branch`, oldest first."""
        return [self.commits[oid] for oid in self.made_on.get(branch, [])]


class FakeHub(BaseHTTPRequestHandler):
    """Answers like the Hub; the state lives on the class, shared by the server's threads."""

    requests: list[tuple[str, str, object]] = []  # (path, Authorization header, JSON body or commit lines)
    repos: dict[str, Repo] = {}
    refuse_with: int | None = None
    refuse_commits: dict[str, list[int]] = {}
    release: threading.Event | None = None
    in_flight = most_in_flight = 0
    lock = threading.Lock()

    @classmethod
    def reset(cls) -> None:
        cls.requests, cls.repos, cls.refuse_with, cls.refuse_commits, cls.release = [], {}, None, {}, None
        cls.in_flight = cls.most_in_flight = 0

    @classmethod
    def branch_files(cls, repo_id: str, branch: str) -> dict[str, bytes]:
        repo = cls.repos[repo_id]
        return repo.commits[repo.branches[branch]].files

    @classmethod
    def summaries(cls, repo_id: str, branch: str) -> list[str]:
        """The summaries of the commits made on `branch`, oldest first, as the client sent them."""
        return [commit.summary for commit in cls.repos[repo_id].history(branch)]

    # ------------------------------------------------------------------------------------ routes

    def do_GET(self):
        self.read_route(send_body=True)

    def do_HEAD(self):
        self.read_route(send_body=False)

    def read_route(self, send_body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "revision":
            repo, commit = self.find(f"{parts[2]}/{parts[3]}", "/".join(parts[5:]))
            if commit is not None:
                self.reply(200, {"id": f"{parts[2]}/{parts[3]}", "sha": commit.oid,
                                 "siblings": [{"rfilename": name} for name in sorted(commit.files)]})
            return
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, commit = self.find(f"{parts[0]}/{parts[1]}", parts[3])
            if commit is None:
                return
            name = "/".join(parts[4:])
            if name not in commit.files:
                return self.reply(404, {"error": "Entry not found"}, error_code="EntryNotFound")
            data = commit.files[name]
            self.send_response(200)
            self.send_header("X-Repo-Commit", commit.oid)
            self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if send_body:
                self.wfile.write(data)
            return
        self.reply(404, {"error": "not found"})  # huggingface_hub looks up optional registries

    def find(self, repo_id: str, revision: str) -> tuple[Repo | None, Commit | None]:
        """The repo and the commit `revision` names, or (None, None) after answering 404 as the Hub does."""
        repo = self.repos.get(repo_id)
        if repo is None:
            self.reply(404, {"error": "Repository not found"}, error_code="RepoNotFound")
            return None, None
        commit = repo.resolve(revision)
        if commit is None:
            self.reply(404, {"error": f"Invalid rev id: {revision}"}, error_code="RevisionNotFound")
        return repo, commit

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Content-Type") == "application/x-ndjson":  # a commit: one JSON object a line
            parsed = [json.loads(line) for line in body.splitlines() if line.strip()]
        else:
            parsed = json.loads(body or b"{}")
        path = urlsplit(self.path).path
        with FakeHub.lock:
            FakeHub.requests.append((self.path, self.headers.get("Authorization"), parsed))
        if FakeHub.refuse_with:
            return self.reply(FakeHub.refuse_with, {"error": "Invalid credentials in Authorization header"})
        base = f"http://{self.headers['Host']}"
        if path == "/api/repos/create":
            repo_id = f"{parsed['organization']}/{parsed['name']}"
            with FakeHub.lock:
                if repo_id not in FakeHub.repos:
                    FakeHub.repos[repo_id] = Repo()
                    FakeHub.repos[repo_id].add_commit("main", "initial commit", {".gitattributes": b""})
            return self.reply(200, {"url": f"{base}/{repo_id}"})
        if path == "/api/validate-yaml":
            return self.reply(200, {"errors": [], "warnings": []})
        parts = unquote(path).strip("/").split("/")
        repo_id = "/".join(parts[2:4])
        if "preupload" in parts:
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in parsed["files"]]
            return self.reply(200, {"files": files})
        if "branch" in parts:
            repo, branch = FakeHub.repos[repo_id], "/".join(parts[parts.index("branch") + 1:])
            if branch in repo.branches:
                return self.reply(409, {"error": "Reference already exists"})
            repo.branches[branch] = repo.branches["main"]
            return self.reply(200, {})
        if "commit" in parts:
            return self.commit(FakeHub.repos[repo_id], repo_id, "/".join(parts[parts.index("commit") + 1:]),
                               parsed, base)
        self.reply(404, {"error": f"no route {self.path}"})

    def commit(self, repo: Repo, repo_id: str, branch: str, lines: list[dict], base: str) -> None:
        summary = lines[0]["value"]["summary"]
        with FakeHub.lock:
            FakeHub.in_flight += 1
            FakeHub.most_in_flight = max(FakeHub.most_in_flight, FakeHub.in_flight)
        try:
            if FakeHub.release is not None:
                FakeHub.release.wait(timeout=300)
            with FakeHub.lock:
                refusal = FakeHub.refuse_commits.get(summary)
                if refusal and refusal[1] > 0:
                    refusal[1] -= 1
                    return self.reply(refusal[0], {"error": "refused by the test"})
                files = dict(repo.commits[repo.branches[branch]].files)
                for line in lines[1:]:
                    if line["key"] == "file":
                        files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                    elif line["key"] == "deletedFile":
                        del files[line["value"]["path"]]
                commit = repo.add_commit(branch, summary, files)
            self.reply(200, {"commitUrl": f"{base}/{repo_id}/commit/{commit.oid}", "commitOid": commit.oid})
        finally:
            with FakeHub.lock:
                FakeHub.in_flight -= 1

    def reply(self, status: int, body: dict, error_code: str | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if error_code:
            self.send_header("X-Error-Code", error_code)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep the test output quiet
        pass


@contextlib.contextmanager
def serve() -> Iterator[str]:
    """Run a FakeHub (its state reset) on a free port of 127.0.0.1; yield its URL (for HF_ENDPOINT)."""
    FakeHub.reset()
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    # shutdown() waits for the loop's next poll: 0.5 s by default, at the end of every test that serves.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        if FakeHub.release is not None:
            FakeHub.release.set()
        server.shutdown()
        server.server_close()
