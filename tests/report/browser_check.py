"""Open an HTML file in real headless Chromium through the DevTools protocol and report what a person
would see: console errors, uncaught exceptions, failed loads, images that did not load, and a
full-page screenshot.

    python tests/report/browser_check.py runs/demo/report.html --screenshot docs/img/report.png

Needs Debian's `chromium` (CI installs it: apt-get install -y chromium) and `websocket-client`.
"""
from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, also when run as a script
from local_servers import stop_process_group  # noqa: E402

INSTALL = "apt-get update && apt-get install -y chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-port=0", "--hide-scrollbars"]
IMAGES_JS = """JSON.stringify(Array.from(document.images).map(i => ({src: i.src.slice(0, 60), alt: i.alt,
  ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth})))"""


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError(f"no Chromium found on PATH; install it with: {INSTALL}")


class _Page:
    def __init__(self, ws_url: str, timeout: float) -> None:
        import websocket  # websocket-client

        self.ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        self.next_id, self.events = 0, []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float) -> None:
        if any(e.get("method") == method for e in self.events):
            return
        end = time.time() + timeout
        while time.time() < end:
            msg = json.loads(self.ws.recv())
            self.events.append(msg)
            if msg.get("method") == method:
                return
        raise TimeoutError(f"no {method} within {timeout}s")


def _errors(events: list[dict[str, Any]]) -> list[str]:
    out = []
    for e in events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description", "")))
                                                               for a in p.get("args", [])))
        elif m == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            out.append("log: " + p["entry"].get("text", "") + " " + p["entry"].get("url", ""))
        elif m == "Network.loadingFailed" and not p.get("canceled"):
            out.append("load failed: " + p.get("errorText", "") + " " + p.get("requestId", ""))
    return out


def check_page(html_path: str | Path, screenshot: str | Path | None = None, width: int = 1240,
               timeout: float = 60.0) -> dict[str, Any]:
    """Load `html_path` in headless Chromium; returns {"errors": [...], "images": [...], "bad_images": [...],
    "height": px, "screenshot": path or None, "title": str}."""
    chromium = find_chromium()
    url = Path(html_path).resolve().as_uri()
    # Chromium's helper processes may still write into the profile just after the browser exits (a loaded
    # machine once failed the folder's removal with "Directory not empty"): the whole group is stopped, and
    # what one still writes after that does not fail the check.
    with tempfile.TemporaryDirectory(prefix="tldr-chromium-", ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen([chromium, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},900",
                                 "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            port_file, end = Path(profile) / "DevToolsActivePort", time.time() + timeout
            while not (port_file.exists() and port_file.read_text().strip()):
                if proc.poll() is not None or time.time() > end:
                    raise RuntimeError(f"Chromium did not start (exit code {proc.poll()})")
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as r:
                targets = [t for t in json.load(r) if t.get("type") == "page"]
            page = _Page(targets[0]["webSocketDebuggerUrl"], timeout)
            for domain in ("Page", "Runtime", "Log", "Network"):
                page.call(f"{domain}.enable")
            page.events.clear()
            page.call("Page.navigate", url=url)
            page.wait_for("Page.loadEventFired", timeout)
            time.sleep(0.3)  # late console messages
            images = json.loads(page.call("Runtime.evaluate", expression=IMAGES_JS,
                                          returnByValue=True)["result"]["value"])
            title = page.call("Runtime.evaluate", expression="document.title", returnByValue=True)["result"]["value"]
            height = int(page.call("Runtime.evaluate", expression="document.documentElement.scrollHeight",
                                   returnByValue=True)["result"]["value"])
            shot = None
            if screenshot is not None:
                page.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                          mobile=False)
                data = page.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
                shot = Path(screenshot)
                shot.parent.mkdir(parents=True, exist_ok=True)
                shot.write_bytes(base64.b64decode(data))
            errors = _errors(page.events)
            page.ws.close()
        finally:
            stop_process_group(proc, ((signal.SIGTERM, 10), (signal.SIGKILL, 10)))  # its helpers with it
    return {"errors": errors, "images": images, "bad_images": [i for i in images if not i["ok"]],
            "height": height, "screenshot": shot, "title": title}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("html")
    ap.add_argument("--screenshot", default=None)
    ap.add_argument("--width", type=int, default=1240)
    a = ap.parse_args()
    res = check_page(a.html, a.screenshot, a.width)
    print(json.dumps({k: (str(v) if k == "screenshot" else v) for k, v in res.items() if k != "images"}, indent=1))
    print(f"{len(res['images'])} images, {len(res['bad_images'])} not loaded, {len(res['errors'])} errors")
    sys.exit(1 if res["errors"] or res["bad_images"] else 0)
