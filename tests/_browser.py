"""Local servers and headless Chromium for the tests that check what a user sees in a browser.

Every server (and Chromium) starts in its own process group and is always ended with
`os.killpg`, so a failing test never leaves a process holding a port. Chromium runs with a fresh
profile and no network beyond 127.0.0.1 (no sync, updates or background requests), driven over
the DevTools protocol with `websockets` (installed with kedro-viz's uvicorn[standard]).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image
from websockets.sync.client import connect

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
    "--window-size=1400,900",
)


def chromium() -> str:
    """Debian's `chromium` (installed by .ci/run); skipped locally, a failure on CI."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "chromium not found (apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def free_port() -> int:
    """A free port below 49152 (kedro-viz refuses the ephemeral range above it)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 49000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found between 20000 and 49000")


def stop(process: subprocess.Popen, grace: float = 5) -> None:
    """Ends the process group: SIGTERM, then SIGKILL if it is still there after `grace` s."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextlib.contextmanager
def serving(command: Sequence[str], url: str, cwd: Path, log: Path,
            env: dict[str, str] | None = None, timeout: float = 120) -> Iterator[str]:
    """Starts a server, waits until `url` answers 200, yields it, and always stops the server."""
    with log.open("w") as out:
        process = subprocess.Popen(list(command), cwd=cwd, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                pytest.fail(f"{command[0]} exited with {process.returncode}:\n"
                            f"{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{url} did not answer in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop(process)


class Page:
    """One headless Chromium tab driven through the DevTools protocol.

    Waiting for a condition in the page (not a fixed delay, nor Chromium's virtual time, which
    does not wait for lazily loaded scripts and charts) is what makes the screenshots reliable on
    a busy machine.
    """

    def __init__(self, workdir: Path, width: int = 1400, height: int = 900):
        workdir.mkdir(parents=True, exist_ok=True)
        self._log = workdir / "chromium.log"
        with self._log.open("w") as log:
            self._process = subprocess.Popen(
                [chromium(), *CHROMIUM_FLAGS, "--remote-debugging-port=0",
                 f"--user-data-dir={workdir / 'chromium-profile'}", "about:blank"],
                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
            )
        try:
            self._exit = contextlib.ExitStack()
            self._socket = self._exit.enter_context(
                connect(self._devtools_url(), max_size=None, open_timeout=30))
            self._next_id = 0
            target = self._call("Target.createTarget", url="about:blank")["targetId"]
            self._session = self._call("Target.attachToTarget", targetId=target,
                                       flatten=True)["sessionId"]
            self._call("Emulation.setDeviceMetricsOverride", session=True, width=width,
                       height=height, deviceScaleFactor=1, mobile=False)
        except BaseException:
            stop(self._process)
            raise

    def _devtools_url(self) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self._process.poll() is None:
            found = re.search(r"DevTools listening on (ws://\S+)", self._log.read_text())
            if found:
                return found.group(1)
            time.sleep(0.2)
        raise RuntimeError(f"chromium did not start its DevTools endpoint:\n"
                           f"{self._log.read_text()[-2000:]}")

    def _call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self._session
        self._socket.send(json.dumps(message))
        while True:
            reply = json.loads(self._socket.recv(timeout=60))
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self._call("Runtime.evaluate", session=True, expression=expression,
                            returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def open(self, url: str, ready: str, timeout: float = 90) -> None:
        """Navigates to `url` and waits until the JavaScript expression `ready` is true there."""
        parts = urlsplit(url)
        ready = f"location.origin === {json.dumps(f'{parts.scheme}://{parts.netloc}')} && ({ready})"
        self._call("Page.navigate", session=True, url=url)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(RuntimeError):  # e.g. the document is not there yet
                if self.evaluate(ready):
                    return
            if time.monotonic() > deadline:
                pytest.fail(f"{url}: `{ready}` still false after {timeout:.0f} s")
            time.sleep(0.5)

    def dom(self) -> str:
        return str(self.evaluate("document.documentElement.outerHTML"))

    def screenshot(self, png: Path) -> Image.Image:
        data = self._call("Page.captureScreenshot", session=True, format="png")["data"]
        png.write_bytes(base64.b64decode(data))
        with Image.open(png) as image:
            return image.convert("RGB")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._exit.close()
        stop(self._process)

    def __enter__(self) -> Page:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def assert_not_blank(image: Image.Image, min_colours: int = 50) -> None:
    """A rendered page has many colours and no single colour covering nearly all of it."""
    pixels = np.asarray(image).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    assert len(colours) >= min_colours, f"only {len(colours)} colours: page looks blank"
    assert counts.max() / len(pixels) < 0.95, "one colour covers >95% of the page: blank"


def copy_to_docs(png: Path, name: str) -> None:
    """With NBCNN_UPDATE_DOCS=1, the screenshot replaces docs/<name> (our own DAG or metrics)."""
    if os.environ.get("NBCNN_UPDATE_DOCS") == "1":
        docs = Path(__file__).resolve().parents[1] / "docs"
        docs.mkdir(exist_ok=True)
        shutil.copy(png, docs / name)
