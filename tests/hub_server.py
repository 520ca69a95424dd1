"""A Hugging Face Hub stand-in on 127.0.0.1 for tests: the file-resolve API that
`huggingface_hub.hf_hub_download` calls, with the headers it reads (huggingface_hub 1.x,
file_download.get_hf_file_metadata: X-Repo-Commit, ETag, Content-Length) and the error codes
its `hf_raise_for_status` maps to GatedRepoError, RepositoryNotFoundError and EntryNotFoundError.

Point a process at it with HF_ENDPOINT=server.url (read when huggingface_hub is imported, so in
a subprocess). `requests` records (method, path, Authorization) for every request."""
from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

REVISION = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, files: dict[str, dict[str, bytes]], gated: Optional[dict[str, str]] = None):
        self.files = files            # repo id -> filename -> content
        self.gated = gated or {}      # repo id -> the token it accepts
        self.requests: list[tuple[str, str, Optional[str]]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _answer(self, head: bool) -> None:
                auth = self.headers.get("Authorization")
                hub.requests.append((self.command, self.path, auth))
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._error(404, "RepoNotFound", head)
                repo, filename = f"{parts[0]}/{parts[1]}", "/".join(parts[4:])
                if repo not in hub.files:
                    return self._error(404, "RepoNotFound", head)
                if repo in hub.gated and auth != f"Bearer {hub.gated[repo]}":
                    return self._error(401, "GatedRepo", head)
                content = hub.files[repo].get(filename)
                if content is None:
                    return self._error(404, "EntryNotFound", head)
                self.send_response(200)
                self.send_header("X-Repo-Commit", REVISION)
                self.send_header("ETag", f'"{hashlib.sha1(content).hexdigest()}"')
                self.send_header("Content-Length", str(len(content)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if not head:
                    self.wfile.write(content)

            def _error(self, status: int, code: str, head: bool) -> None:
                body = f'{{"error": "{code}"}}'.encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def do_HEAD(self):
                self._answer(head=True)

            def do_GET(self):
                self._answer(head=False)

        return Handler
