"""Drive a real headless Chromium over the DevTools protocol, on a pipe (`--remote-debugging-pipe`:
JSON messages separated by NUL bytes on file descriptors 3 and 4), with the standard library alone:
no websocket client, no browser download. Used by the HTML report's test and to refresh its
screenshot under docs/.

    with Chromium() as browser:
        page = browser.open(Path("report.html"))
        page.evaluate("document.title"), page.errors, page.screenshot(Path("shot.png"))
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TIMEOUT_SECONDS = 60.0


def find_chromium() -> Optional[str]:
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


class Page:
    """One tab: what it logged as errors (console.error, uncaught exceptions, failed loads)."""

    def __init__(self, browser: "Chromium", session: str):
        self.browser, self.session = browser, session
        self.errors: list[str] = []

    def evaluate(self, expression: str) -> Any:
        result = self.browser.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                        "awaitPromise": True}, self.session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def screenshot(self, path: Path, width: int = 1200) -> None:
        height = int(self.evaluate("Math.ceil(document.documentElement.scrollHeight)"))
        self.browser.call("Emulation.setDeviceMetricsOverride",
                          {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, self.session)
        shot = self.browser.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, self.session)
        Path(path).write_bytes(base64.b64decode(shot["data"]))


class Chromium:
    def __init__(self, executable: Optional[str] = None):
        self.executable = executable or find_chromium()
        if self.executable is None:
            raise FileNotFoundError("no Chromium found (Debian: apt-get install chromium)")
        self._next_id = 0
        self._buffer = b""
        self._pages: dict[str, Page] = {}

    def __enter__(self) -> "Chromium":
        self._profile = tempfile.mkdtemp(prefix="spotune-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # The browser reads commands on fd 3 and writes replies on fd 4.
        def child_fds():
            # Copies first: either pipe end may itself be fd 3 or 4. dup2 onto the same number keeps
            # close-on-exec, hence set_inheritable.
            reading, writing = os.dup(to_browser_r), os.dup(from_browser_w)
            os.dup2(reading, 3)
            os.dup2(writing, 4)
            os.set_inheritable(3, True)
            os.set_inheritable(4, True)
        args = [self.executable, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-dev-shm-usage",
                f"--user-data-dir={self._profile}", "about:blank"]
        # close_fds=False: the fds dup2'ed to 3 and 4 are inheritable; every other fd Python opened is
        # close-on-exec already, so nothing else leaks into the browser.
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, preexec_fn=child_fds, close_fds=False)
        os.close(to_browser_r)
        os.close(from_browser_w)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.call("Browser.close", {})
        except Exception:
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
        shutil.rmtree(self._profile, ignore_errors=True)

    # ---- the protocol ------------------------------------------------------------------------
    def call(self, method: str, params: dict, session: Optional[str] = None) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            self._event(reply)

    def _read(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or self._proc.poll() is not None:
                raise TimeoutError("Chromium did not answer")
            ready, _, _ = select.select([self._from_browser], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._from_browser, 1 << 16)
                if not chunk:
                    raise EOFError("Chromium closed its pipe")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def _event(self, message: dict) -> None:
        page = self._pages.get(message.get("sessionId", ""))
        if page is None:
            return
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            page.errors.append(f"uncaught: {details.get('exception', {}).get('description') or details.get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            page.errors.append("console.error: " + " ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            page.errors.append(f"log: {params['entry'].get('text')}")

    def open(self, path: Path, ready: str = "document.body && document.body.dataset.rendered === 'yes'") -> Page:
        """Load a file in a new tab, collecting errors from the start, and wait until `ready` holds."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = self._pages[session] = Page(self, session)
        for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
            self.call(domain, {}, session)
        self.call("Page.navigate", {"url": Path(path).resolve().as_uri()}, session)
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if page.evaluate(f"Boolean({ready})"):
                return page
            if page.errors:
                return page
            time.sleep(0.1)
        raise TimeoutError(f"{path} did not finish rendering; errors: {page.errors}")
