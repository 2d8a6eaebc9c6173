"""A loopback stub of the Hugging Face Hub HTTP API (standard library only), for offline upload/download tests.

It implements what `huggingface_hub` (2.x, with `HF_HUB_DISABLE_XET=1`) and transformers' `from_pretrained` use:
whoami, repo creation, YAML validation, pre-upload, git-LFS "basic" batch + PUT, NDJSON commits, repo info, tree
listing, and `HEAD`/`GET .../resolve/{revision}/{path}`, for model repos and Space repos (created with an SDK).
Everything lives in memory.

    with HubStub() as hub:          # 127.0.0.1, a free port, a daemon thread
        hub.url                     # "http://127.0.0.1:PORT"
        hub.files("tester/repo")    # {path: bytes} of the last commit
        hub.files("tester/demo", repo_type="space")
        hub.requests                # [(method, path)] seen, for assertions
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

USER = "tester"
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".png")


SPACE_SDKS = ("gradio", "docker", "static", "streamlit")


def repo_key(repo_id: str, repo_type: str | None = "model") -> str:
    """Key of `HubStub.repos`: the repo id for models (as in the URLs), `spaces/<id>` for Spaces."""
    return repo_id if repo_type in (None, "model") else f"{repo_type}s/{repo_id}"


class _Repo:
    def __init__(self, repo_id: str, private: bool, repo_type: str = "model", sdk: str | None = None):
        self.repo_id = repo_id
        self.private = private
        self.repo_type = repo_type
        self.sdk = sdk
        self.files: dict[str, bytes] = {}
        self.commits: list[str] = [hashlib.sha1(f"init:{repo_id}".encode()).hexdigest()]

    @property
    def sha(self) -> str:
        return self.commits[-1]


class HubStub:
    """In-memory Hub on 127.0.0.1. Use as a context manager or call `start()` / `stop()`."""

    def __init__(self, request_timeout: float = 30.0):
        self.repos: dict[str, _Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.request_timeout = request_timeout
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> HubStub:
        stub = self

        class Handler(_Handler):
            hub = stub
            timeout = stub.request_timeout  # per-connection socket timeout: no request can hang the server

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> HubStub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ------------------------------------------------------------------ helpers for tests
    def files(self, repo_id: str, repo_type: str = "model") -> dict[str, bytes]:
        return dict(self.repos[repo_key(repo_id, repo_type)].files)

    def add_repo(self, repo_id: str, files: dict[str, bytes]) -> None:
        """Create a repo directly with some files (e.g. an incomplete one)."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, _Repo(repo_id, False))
            repo.files.update(files)
            repo.commits.append(hashlib.sha1(f"{repo_id}:{len(repo.commits)}:direct".encode()).hexdigest())


class _Handler(BaseHTTPRequestHandler):
    hub: HubStub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    # ------------------------------------------------------------------ responses
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict | None = None):
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, status: int, code: str, message: str):
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            return self.rfile.read(length)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return b""

    # ------------------------------------------------------------------ routing
    def do_GET(self):
        self._route()

    def do_HEAD(self):
        self._route()

    def do_POST(self):
        self._route()

    def do_PUT(self):
        self._route()

    def _route(self):
        hub = self.hub
        path = unquote(urlsplit(self.path).path)
        hub.requests.append((self.command, path))
        parts = [p for p in path.split("/") if p]
        method = self.command
        try:
            if method == "GET" and path == "/api/whoami-v2":
                return self._json(
                    200,
                    {
                        "type": "user",
                        "name": USER,
                        "fullname": USER,
                        "orgs": [],
                        "auth": {"accessToken": {"role": "write", "displayName": "stub"}},
                    },
                )
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo(json.loads(self._body() or b"{}"))
            if method == "POST" and path == "/api/validate-yaml":
                self._body()
                return self._json(200, {"errors": [], "warnings": []})
            if method == "PUT" and parts[:1] == ["lfs-upload"] and len(parts) == 2:
                return self._lfs_put(parts[1])
            if parts[:2] in (["api", "models"], ["api", "spaces"]) and len(parts) >= 4:
                return self._api_repos(method, parts[1][:-1], parts[2:])
            if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
                return self._lfs_batch(path[1 : -len(".git/info/lfs/objects/batch")])
            if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
            if method in ("GET", "HEAD") and parts[:1] == ["spaces"] and len(parts) >= 6 and parts[3] == "resolve":
                return self._resolve("/".join(parts[:3]), parts[4], "/".join(parts[5:]))
        except Exception as error:  # noqa: BLE001 - a stub bug must surface as an HTTP 500, not a hang
            return self._json(500, {"error": f"stub error: {error!r}"})
        hub.unhandled.append((method, path))
        self._error(404, "NotImplemented", f"stub: no route for {method} {path}")

    # ------------------------------------------------------------------ endpoints
    def _repo(self, key: str) -> _Repo | None:
        return self.hub.repos.get(key)

    def _create_repo(self, body: dict):
        repo_type = body.get("type") or "model"
        if repo_type not in ("model", "space"):
            return self._error(400, "BadRequest", "stub: model and space repos only")
        if repo_type == "space" and body.get("sdk") not in SPACE_SDKS:
            return self._error(400, "BadRequest", f"a Space needs an sdk in {SPACE_SDKS}, got {body.get('sdk')!r}")
        name = body.get("name")
        owner = body.get("organization") or USER
        repo_id = f"{owner}/{name}"
        key = repo_key(repo_id, repo_type)
        with self.hub.lock:
            if key in self.hub.repos:
                return self._json(
                    409, {"error": f"You already created this {repo_type} repo", "url": f"{self._base()}/{key}"}
                )
            self.hub.repos[key] = _Repo(repo_id, bool(body.get("private")), repo_type, body.get("sdk"))
        return self._json(200, {"url": f"{self._base()}/{key}", "name": repo_id})

    def _base(self) -> str:
        return self.hub.url

    def _api_repos(self, method: str, repo_type: str, rest: list[str]):
        repo_id = "/".join(rest[:2])
        tail = rest[2:]
        repo = self._repo(repo_key(repo_id, repo_type))
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
        if method == "GET" and (not tail or (tail[0] == "revision" and len(tail) >= 2)):
            return self._json(200, self._info(repo))
        if method == "POST" and tail[:1] == ["preupload"]:
            body = json.loads(self._body() or b"{}")
            files = [
                {
                    "path": f["path"],
                    "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                    "shouldIgnore": False,
                    "oid": None,
                }
                for f in body.get("files", [])
            ]
            return self._json(200, {"files": files})
        if method == "POST" and tail[:1] == ["commit"]:
            return self._commit(repo, self._body())
        if method == "GET" and tail[:1] == ["tree"] and len(tail) >= 2:
            return self._tree(repo, "/".join(tail[2:]))
        if method == "GET" and tail[:1] == ["refs"]:
            return self._json(
                200,
                {
                    "branches": [{"name": "main", "ref": "refs/heads/main", "targetCommit": repo.sha}],
                    "converts": [],
                    "tags": [],
                },
            )
        route = f"/api/{repo_type}s/{'/'.join(rest)}"
        self.hub.unhandled.append((method, route))
        return self._error(404, "NotImplemented", f"stub: no route for {method} {route}")

    def _info(self, repo: _Repo) -> dict:
        info = {
            "id": repo.repo_id,
            "_id": repo.sha[:24],
            "sha": repo.sha,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "siblings": [{"rfilename": name, "size": len(data)} for name, data in sorted(repo.files.items())],
            "lastModified": "2026-01-01T00:00:00.000Z",
            "createdAt": "2026-01-01T00:00:00.000Z",
        }
        if repo.repo_type == "space":
            info["sdk"] = repo.sdk
        else:
            info["modelId"] = repo.repo_id
        return info

    def _tree(self, repo: _Repo, prefix: str):
        prefix = prefix.strip("/")
        entries, folders = [], set()
        for name, data in sorted(repo.files.items()):
            if prefix and not (name == prefix or name.startswith(prefix + "/")):
                continue
            relative = name[len(prefix) + 1 :] if prefix else name
            if "/" in relative:
                folders.add((prefix + "/" if prefix else "") + relative.split("/")[0])
                continue
            entries.append({"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()})
        if prefix and not entries and not folders:
            return self._error(404, "EntryNotFound", f"{prefix} does not exist on main")
        entries += [
            {"type": "directory", "path": f, "size": 0, "oid": hashlib.sha1(f.encode()).hexdigest()}
            for f in sorted(folders)
        ]
        return self._json(200, entries)

    def _commit(self, repo: _Repo, body: bytes):
        added, deleted = {}, []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "file":
                added[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.hub.lfs:
                    return self._error(400, "BadRequest", f"LFS object {value['oid']} was not uploaded")
                added[value["path"]] = self.hub.lfs[value["oid"]]
            elif key == "deletedFile":
                deleted.append(value["path"])
        with self.hub.lock:
            repo.files.update(added)
            for path in deleted:
                repo.files.pop(path, None)
            sha = hashlib.sha1(f"{repo.repo_id}:{len(repo.commits)}:{sorted(added)}".encode()).hexdigest()
            repo.commits.append(sha)
        key = repo_key(repo.repo_id, repo.repo_type)
        return self._json(200, {"commitUrl": f"{self._base()}/{key}/commit/{sha}", "commitOid": sha, "success": True})

    def _lfs_batch(self, key: str):
        body = json.loads(self._body() or b"{}")
        if self._repo(key) is None:
            return self._error(404, "RepoNotFound", f"Repository {key} not found")
        objects = []
        for obj in body.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.hub.lfs:
                entry["actions"] = {"upload": {"href": f"{self._base()}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_put(self, oid: str):
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "BadRequest", "sha256 mismatch")
        self.hub.lfs[oid] = data
        return self._send(200, b"")

    def _resolve(self, key: str, revision: str, filename: str):
        repo = self._repo(key)
        if repo is None:
            return self._error(404, "RepoNotFound", f"Repository {key} not found")
        if revision not in ("main", *repo.commits):
            return self._error(404, "RevisionNotFound", f"Revision {revision} not found")
        data = repo.files.get(filename)
        if data is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist on {revision}")
        etag = hashlib.sha256(data).hexdigest() if filename.endswith(LFS_SUFFIXES) else hashlib.sha1(data).hexdigest()
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": repo.sha, "Accept-Ranges": "bytes"}
        if filename.endswith(LFS_SUFFIXES):
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        self._send(200, data, headers, content_type="application/octet-stream")
