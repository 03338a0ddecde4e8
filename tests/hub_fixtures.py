"""A local stand-in for the Hugging Face Hub, enough for huggingface_hub's create_repo,
create_branch, repo_info, create_commit and the legacy LFS upload path.

It speaks the same endpoints and JSON shapes as huggingface.co (as huggingface_hub 2.4
calls them), checks the bearer token, keeps each repository's branches as dicts of
{path: bytes}, applies a commit all at once or not at all, and records every request so a
test can see what arrived. Failures are injected per endpoint with `fail[kind] = status`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlparse

import yaml

REPO = r"(?P<repo>[^/]+/[^/]+?)"
ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"^/api/repos/create$"), "create"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/models/{REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("POST", re.compile(rf"^/api/models/{REPO}/branch/(?P<rev>[^/]+)$"), "branch"),
    ("GET", re.compile(rf"^/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?$"), "repo_info"),
    ("POST", re.compile(rf"^/{REPO}\.git/info/lfs/objects/batch$"), "lfs_batch"),
    ("PUT", re.compile(r"^/lfs-storage/(?P<oid>[0-9a-f]{64})$"), "lfs_put"),
    ("POST", re.compile(r"^/lfs-verify$"), "lfs_verify"),
]


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class HubState:
    token: str
    repos: dict[str, Repo] = field(default_factory=dict)
    lfs_blobs: dict[str, bytes] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)  # every request: kind, path, headers, body
    fail: dict[str, int] = field(default_factory=dict)  # endpoint kind -> HTTP status to answer
    echo_token_in_errors: bool = False  # a hostile server that repeats the credentials back
    lock: threading.Lock = field(default_factory=threading.Lock)

    def commits(self) -> list[dict[str, Any]]:
        return [c for repo in self.repos.values() for c in repo.commits]


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().strip().split(b";")[0], 16)
            if size == 0:
                handler.rfile.readline()
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def make_handler(state: HubState, endpoint: list[str]):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str, code: str | None = None, **extra: Any) -> None:
            if state.echo_token_in_errors:
                message += f" (credentials received: {self.headers.get('Authorization')})"
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, {"error": message, **extra}, headers)

        def _handle(self, method: str) -> None:
            path = unquote(urlparse(self.path).path)
            body = _read_body(self)
            for route_method, pattern, kind in ROUTES:
                match = pattern.match(path) if route_method == method else None
                if match:
                    break
            else:
                self._send(404, {"error": f"no route {method} {path}"})
                return
            with state.lock:
                state.requests.append({"kind": kind, "method": method, "path": path,
                                       "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})  # fmt: skip
            if kind in state.fail:
                self._error(state.fail[kind], f"refused by the test server ({kind})")
                return
            if kind != "lfs_put" and self.headers.get("Authorization") != f"Bearer {state.token}":
                self._error(401, "Invalid credentials in Authorization header")
                return
            getattr(self, f"_{kind}")(match.groupdict(), body)

        def do_GET(self):
            self._handle("GET")

        def do_POST(self):
            self._handle("POST")

        def do_PUT(self):
            self._handle("PUT")

        # --- endpoints -------------------------------------------------------------
        def _create(self, _, body: bytes) -> None:
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            with state.lock:
                if repo_id in state.repos:
                    # The Hub answers a second create with 409 and the repo's url.
                    self._error(409, "You already created this model repo", url=f"{endpoint[0]}/{repo_id}")
                    return
                state.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
            self._send(200, {"url": f"{endpoint[0]}/{repo_id}", "name": repo_id})

        def _repo_info(self, params: dict[str, str], _) -> None:
            repo = state.repos.get(params["repo"])
            if repo is None or (params.get("rev") or "main") not in repo.branches:
                self._error(404, "Repository not found", code="RepoNotFound")
                return
            sha = repo.commits[-1]["oid"] if repo.commits else "0" * 40
            self._send(200, {"id": params["repo"], "sha": sha, "private": repo.private, "siblings": []})

        def _validate_yaml(self, _, body: bytes) -> None:
            content = json.loads(body)["content"]
            match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            errors = []
            if match is None:
                errors.append({"message": "no YAML metadata block"})
            elif not isinstance(yaml.safe_load(match.group(1)), dict):
                errors.append({"message": "metadata is not a mapping"})
            self._send(400 if errors else 200, {"errors": errors, "warnings": []})

        def _preupload(self, params: dict[str, str], body: bytes) -> None:
            if params["repo"] not in state.repos:
                self._error(404, "Repository not found", code="RepoNotFound")
                return
            files = json.loads(body)["files"]
            modes = [
                {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                 "shouldIgnore": False, "oid": None}
                for f in files
            ]  # fmt: skip
            self._send(200, {"files": modes, "commitOid": "0" * 40})

        def _lfs_batch(self, _, body: bytes) -> None:
            objects = json.loads(body)["objects"]
            answer = [
                {"oid": o["oid"], "size": o["size"], "authenticated": True, "actions": {
                    "upload": {"href": f"{endpoint[0]}/lfs-storage/{o['oid']}"},
                    "verify": {"href": f"{endpoint[0]}/lfs-verify"}}}
                for o in objects
            ]  # fmt: skip
            self._send(200, {"transfer": "basic", "objects": answer})

        def _lfs_put(self, params: dict[str, str], body: bytes) -> None:
            if hashlib.sha256(body).hexdigest() != params["oid"]:
                self._error(400, "content does not match its oid")
                return
            with state.lock:
                state.lfs_blobs[params["oid"]] = body
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _lfs_verify(self, _, body: bytes) -> None:
            payload = json.loads(body)
            blob = state.lfs_blobs.get(payload["oid"])
            if blob is None or len(blob) != payload["size"]:
                self._error(404, "object not uploaded")
                return
            self._send(200, {"success": True})

        def _branch(self, params: dict[str, str], _) -> None:
            repo = state.repos.get(params["repo"])
            if repo is None:
                self._error(404, "Repository not found", code="RepoNotFound")
                return
            with state.lock:
                if params["rev"] in repo.branches:
                    self._error(409, "Branch already exists")
                    return
                repo.branches[params["rev"]] = dict(repo.branches["main"])
            self._send(200, {})

        def _commit(self, params: dict[str, str], body: bytes) -> None:
            repo = state.repos.get(params["repo"])
            if repo is None or params["rev"] not in repo.branches:
                self._error(404, "Repository not found", code="RepoNotFound")
                return
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            header = lines[0]["value"]
            files: dict[str, bytes] = {}
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    blob = state.lfs_blobs.get(value["oid"])
                    if blob is None:
                        self._error(400, f"LFS object {value['oid']} was never uploaded")
                        return
                    files[value["path"]] = blob
                else:
                    self._error(400, f"unexpected commit operation {line['key']}")
                    return
            oid = hashlib.sha1(body).hexdigest()
            with state.lock:  # the whole commit lands at once
                repo.branches[params["rev"]].update(files)
                repo.commits.append({"oid": oid, "revision": params["rev"], "summary": header["summary"],
                                     "files": sorted(files)})  # fmt: skip
            self._send(200, {"commitOid": oid, "commitUrl": f"{endpoint[0]}/{params['repo']}/commit/{oid}",
                             "success": True})  # fmt: skip

    return Handler


class FakeHub:
    """Run the stand-in Hub on 127.0.0.1 at a free port, in a background thread."""

    def __init__(self, token: str):
        self.state = HubState(token=token)
        self._endpoint: list[str] = [""]
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self.state, self._endpoint))
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._endpoint[0] = self.endpoint
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
