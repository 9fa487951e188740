"""Debian's headless Chromium, driven over the DevTools protocol on a pipe (no extra packages).

Why not `chromium --headless --dump-dom/--screenshot URL`: its command handler gives up on a 401
("Page load failed: net::ERR_INVALID_AUTH_CREDENTIALS") instead of showing the page, and basic-auth
credentials would have to sit in the URL, on a command line every local user can read, where
`fetch()` then refuses relative URLs (measured with Chromium 156). Over the protocol the browser
meets the 401 as a person does: it shows the server's page, or answers the login prompt with the
credentials given here (Fetch.authRequired), which never leave this process.

    with Chromium(timeout=30) as browser:
        page = browser.visit(url, credentials=("user", "password"), until=["in the DOM"])
        page.status, page.dom, page.text, browser.screenshot(path)
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# What the measured command line keeps away: a GPU, QUIC, first-run pages, Google's services.
FLAGS = (
    "--headless",
    "--no-sandbox",  # the controller runs the tests as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--ignore-certificate-errors",  # the proxy's self-signed certificate
    "--remote-debugging-pipe",
)


def _above_4(*fds: int) -> tuple[int, ...]:
    """The same pipes on descriptors above 4 (close-on-exec)."""
    moved = tuple(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5) for fd in fds)
    for fd in fds:
        os.close(fd)
    return moved


class BrowserError(AssertionError):
    """The browser failed, or a page did not show what was expected in time."""


@dataclass
class Page:
    url: str
    status: int  # of the document's last response; 0 if none was seen for `url`
    dom: str
    text: str


class Chromium:
    """One Chromium process with a fresh profile, one tab, every step bounded by `timeout`."""

    def __init__(self, timeout: float = 30, window: tuple[int, int] = (1280, 720)) -> None:
        self.timeout = timeout
        self.window = window
        self._next_id = 0
        self._session = ""
        self._events: list[dict[str, Any]] = []
        self._buffer = b""
        self._credentials: tuple[str, str] | None = None
        self._status: dict[str, int] = {}
        self._failed: list[str] = []
        self._urls: dict[str, str] = {}  # request id -> URL, for the failures

    def __enter__(self) -> Chromium:
        self._scratch = Path(tempfile.mkdtemp(prefix="chromium-"))
        self._log = (self._scratch / "chromium.log").open("w+b")
        to_browser, self._write = _above_4(*os.pipe())
        self._read, from_browser = _above_4(*os.pipe())

        # --remote-debugging-pipe reads commands on 3 and writes replies on 4; the shell moves the
        # pipes there (from above 4, so neither move overwrites the other).
        self._process = subprocess.Popen(
            [
                "bash",  # dash takes one-digit descriptors only
                "-c",
                f'exec "$@" 3<&{to_browser} 4>&{from_browser} {to_browser}<&- {from_browser}>&-',
                "bash",
                "chromium",
                *FLAGS,
                f"--user-data-dir={self._scratch / 'profile'}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,  # a file: a pipe nobody reads would fill up and block Chromium
            pass_fds=(to_browser, from_browser),
        )
        os.close(to_browser)
        os.close(from_browser)
        try:
            targets = self.call("Target.getTargets")["targetInfos"]
            tab = next(t["targetId"] for t in targets if t["type"] == "page")
            attached = self.call("Target.attachToTarget", targetId=tab, flatten=True)
            self._session = attached["sessionId"]
            width, height = self.window
            # The page's own viewport (a headless window's size includes room for its toolbars).
            self.call(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
            self.call("Page.enable")
            self.call("Network.enable")
            # Every request pauses at the Fetch domain, so a 401's login prompt comes here too.
            self.call("Fetch.enable", handleAuthRequests=True, patterns=[{"urlPattern": "*"}])
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._write)
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        os.close(self._read)
        self._log.close()
        shutil.rmtree(self._scratch, ignore_errors=True)

    # -- the protocol: JSON messages separated by NUL bytes ------------------------------------

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command to the tab (or the browser before a tab is attached); its result."""
        self._next_id += 1
        command = self._next_id
        message: dict[str, Any] = {"id": command, "method": method, "params": params}
        if self._session:
            message["sessionId"] = self._session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == command:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._handle(reply)

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise BrowserError(f"Chromium did not answer within {self.timeout:g} s")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                self._process.wait(timeout=5)
                self._log.seek(0)
                errors = self._log.read().decode(errors="replace")
                raise BrowserError(
                    f"Chromium exited ({self._process.returncode}):\n{errors[-3000:]}"
                )
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def _handle(self, event: dict[str, Any]) -> None:
        """Answer paused requests and login prompts at once; keep the rest for `_wait_for`."""
        method, params = event.get("method"), event.get("params", {})
        if method == "Fetch.requestPaused":
            self._send_quietly("Fetch.continueRequest", requestId=params["requestId"])
        elif method == "Fetch.authRequired":
            if self._credentials:
                user, password = self._credentials
                answer = {"response": "ProvideCredentials", "username": user, "password": password}
            else:  # what a person does at the prompt without the password: Cancel
                answer = {"response": "CancelAuth"}
            self._send_quietly(
                "Fetch.continueWithAuth",
                requestId=params["requestId"],
                authChallengeResponse=answer,
            )
        elif method == "Network.requestWillBeSent":
            self._urls[params["requestId"]] = params["request"]["url"]
        elif method == "Network.loadingFailed":
            # No response at all (aborted, reset, timed out): the page's own retries hide it.
            url = self._urls.get(params["requestId"], params["requestId"])
            self._failed.append(f"{params.get('errorText', 'failed')} {url}")
        elif method == "Network.responseReceived":
            response = params["response"]
            if params.get("type") == "Document":
                self._status[response["url"]] = response["status"]
            if response["status"] >= 400:
                self._failed.append(f"{response['status']} {response['url']}")
        elif method:
            self._events.append(event)

    def _send_quietly(self, method: str, **params: Any) -> None:
        """A command whose reply nobody waits for (its reply is read and dropped later)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        message["sessionId"] = self._session
        os.write(self._write, json.dumps(message).encode() + b"\0")

    # -- what a test does -----------------------------------------------------------------------

    def visit(
        self,
        url: str,
        credentials: tuple[str, str] | None = None,
        until: Sequence[str] = (),
    ) -> Page:
        """Open `url`, answering a login prompt with `credentials` (none: Cancel), and wait until
        the page has loaded and its DOM contains every string of `until` (what JavaScript fills
        in arrives after the load event). Raises BrowserError with what the page shows and the
        requests that failed if it does not in time."""
        wanted = [until] if isinstance(until, str) else list(until)
        self._credentials = credentials
        self._status.clear()
        self._failed.clear()
        self._events.clear()
        navigated = self.call("Page.navigate", url=url)
        if navigated.get("errorText"):
            raise BrowserError(f"{url}: {navigated['errorText']}")
        deadline = time.monotonic() + self.timeout
        self._wait_for(lambda e: e.get("method") == "Page.loadEventFired", deadline, url)
        dom = self.dom()
        while missing := [text for text in wanted if text not in dom]:
            if time.monotonic() > deadline:
                raise BrowserError(
                    f"{url}: no {missing} in the DOM within {self.timeout:g} s; failed requests: "
                    f"{self._failures()}; the page reads:\n{self.text()}"
                )
            self._pump(0.5)
            dom = self.dom()
        return Page(
            url=self.evaluate("location.href"),
            status=self._status.get(url, 0),
            dom=dom,
            text=self.text(),
        )

    def _wait_for(
        self, matches: Callable[[dict[str, Any]], bool], deadline: float, what: str
    ) -> None:
        while not any(matches(event) for event in self._events):
            try:
                self._handle(self._receive(deadline))
            except BrowserError as error:
                failed = self._failures()
                raise BrowserError(f"{what}: {error}; failed requests: {failed}") from None

    def _failures(self, last: int = 5) -> str:
        if not self._failed:
            return "none"
        shown = "; ".join(self._failed[-last:])
        return f"{len(self._failed)}, the last: {shown}" if len(self._failed) > last else shown

    def _pump(self, seconds: float) -> None:
        """Let the page run for `seconds`, answering its paused requests meanwhile."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            left = max(0.0, deadline - time.monotonic())
            if b"\0" in self._buffer or select.select([self._read], [], [], left)[0]:
                self._handle(self._receive(deadline + self.timeout))

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def dom(self) -> str:
        """The document as it is now, scripts' changes included (what --dump-dom prints)."""
        return self.evaluate("document.documentElement.outerHTML") or ""

    def text(self) -> str:
        """What the page shows, as a person reads it (innerText: no markup, no hidden nodes)."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def screenshot(self, path: Path) -> Path:
        """A PNG of the tab's viewport (the window size) into `path`."""
        shot = self.call("Page.captureScreenshot", format="png")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path
