#!/usr/bin/env python3
"""Renders a self-contained HTML page in headless Chromium and says what it shows.

    page-check.py --chromium PATH --page FILE.html --screenshot OUT.png \
                  --charts sizes,revenue,... [--width 1400 --height 2400] [--timeout 60]

Chromium is started headless on a fresh profile (a temporary folder, removed at the
end) with its DevTools endpoint on a free port; the script drives the page over the
Chrome DevTools Protocol (a websocket, through the PyPI package websocket-client):
it opens file:///<abs path>, waits for the load event, and reads from the rendered
page, for each expected chart, its `figure[data-chart=NAME]`: whether it is there,
whether it holds an <svg>, the svg's size on screen (getBoundingClientRect) and how
many marks (rect, circle, path, polyline, line, polygon with a non-empty box,
outside <defs>-like containers) and texts (<text> with some text) the svg draws.
It then saves a screenshot of the whole page (PNG) and prints ONE JSON object:

    {"requests": [URL...],           every request but the page's own file (and data:)
     "errors": [TEXT...],            console error/warning/assert, uncaught exceptions,
                                     Log entries of level error/warning
     "charts": {NAME: {"present", "svg", "width", "height", "marks", "texts"}},
     "unexpected_charts": [NAME...], figures with a data-chart not asked for
     "screenshot": PATH, "title": document.title}

Exit 0 when all of that was done (the caller judges the content); 1, with a message
on stderr, when Chromium did not start, the page did not load, or the protocol
failed; 2 on bad arguments. Python 3 standard library and websocket-client only.
"""

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

try:
    import websocket  # websocket-client
except ImportError:
    sys.exit(
        "page-check: the Python package websocket-client is missing; "
        "run scripts/test.sh (it installs it into target/page-venv)"
    )


class CheckError(Exception):
    """The check could not be done (not: the page is wrong)."""


# Evaluated in the page with the expected chart names as its argument.
CHARTS_JS = r"""
(names) => {
  const MARKS = 'rect, circle, ellipse, path, polyline, line, polygon';
  const HIDDEN = 'defs, clipPath, mask, marker, pattern, symbol';
  const round = (v) => Math.round(v * 10) / 10;
  const charts = {};
  for (const name of names) {
    const fig = document.querySelector('figure[data-chart="' + CSS.escape(name) + '"]');
    const c = {present: !!fig, svg: false, width: 0, height: 0, marks: 0, texts: 0};
    const svg = fig ? fig.querySelector('svg') : null;
    if (svg) {
      const box = svg.getBoundingClientRect();
      c.svg = true;
      c.width = round(box.width);
      c.height = round(box.height);
      for (const el of svg.querySelectorAll(MARKS)) {
        if (el.closest(HIDDEN)) continue;
        const b = el.getBoundingClientRect();
        if (b.width > 0 || b.height > 0) c.marks += 1;
      }
      for (const el of svg.querySelectorAll('text')) {
        if (el.closest(HIDDEN)) continue;
        if (el.textContent.trim() !== '') c.texts += 1;
      }
    }
    charts[name] = c;
  }
  const unexpected = [];
  for (const fig of document.querySelectorAll('figure[data-chart], figure.chart')) {
    const name = fig.getAttribute('data-chart');
    if (name === null) unexpected.push('(figure.chart without data-chart)');
    else if (!names.includes(name)) unexpected.push(name);
  }
  return {charts, unexpected_charts: unexpected, title: document.title};
}
"""


class Cdp:
    """One websocket to one target: commands and the events that arrive meanwhile."""

    def __init__(self, ws_url, on_event):
        # No Origin header: Chromium refuses websocket clients that send one it does
        # not allow (--remote-allow-origins).
        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.on_event = on_event
        self.next_id = 0

    def close(self):
        try:
            self.ws.close()
        except Exception:
            pass

    def _recv(self, deadline):
        """The next message, or None when `deadline` passes first."""
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        self.ws.settimeout(left)
        try:
            raw = self.ws.recv()
        except websocket.WebSocketTimeoutException:
            return None
        except (websocket.WebSocketException, OSError) as e:
            raise CheckError(f"the DevTools connection failed: {e}") from e
        return json.loads(raw)

    def call(self, method, params=None, timeout=30):
        self.next_id += 1
        ident = self.next_id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            msg = self._recv(deadline)
            if msg is None:
                raise CheckError(f"{method}: no answer from Chromium within {timeout} s")
            if msg.get("id") == ident:
                if "error" in msg:
                    raise CheckError(f"{method}: {msg['error'].get('message', msg['error'])}")
                return msg.get("result", {})
            if "method" in msg:
                self.on_event(msg["method"], msg.get("params", {}))

    def wait_for(self, method, deadline):
        """Handles events until `method` arrives (True) or `deadline` passes (False)."""
        while True:
            msg = self._recv(deadline)
            if msg is None:
                return False
            if "method" in msg:
                self.on_event(msg["method"], msg.get("params", {}))
                if msg["method"] == method:
                    return True

    def drain(self, quiet=0.5, most=3.0):
        """Handles events until none came for `quiet` s (at most `most` s)."""
        end = time.monotonic() + most
        while time.monotonic() < end:
            msg = self._recv(min(end, time.monotonic() + quiet))
            if msg is None:
                return
            if "method" in msg:
                self.on_event(msg["method"], msg.get("params", {}))


class Findings:
    """What the page asked for and complained about, from the protocol's events."""

    def __init__(self, page_url):
        self.page_url = page_url
        self.requests = []
        self.errors = []

    def __call__(self, method, p):
        if method == "Network.requestWillBeSent":
            url = p.get("request", {}).get("url", "")
            if url.split("#")[0] != self.page_url and not url.startswith("data:"):
                if url not in self.requests:
                    self.requests.append(url)
        elif method == "Runtime.consoleAPICalled":
            if p.get("type") in ("error", "warning", "assert"):
                args = " ".join(_remote_text(a) for a in p.get("args", []))
                self.errors.append(f"console.{p['type']}: {args}{_where(p.get('stackTrace'))}")
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            exc = d.get("exception") or {}
            text = exc.get("description") or d.get("text", "exception")
            self.errors.append(f"exception: {text} (at {d.get('url', '?')}:{d.get('lineNumber', '?')})")
        elif method == "Log.entryAdded":
            e = p.get("entry", {})
            if e.get("level") in ("error", "warning"):
                where = f" ({e['url']})" if e.get("url") else ""
                self.errors.append(f"log {e['level']} [{e.get('source', '?')}]: {e.get('text', '')}{where}")


def _remote_text(obj):
    if "value" in obj:
        v = obj["value"]
        return v if isinstance(v, str) else json.dumps(v)
    return obj.get("description") or obj.get("unserializableValue") or obj.get("type", "?")


def _where(stack):
    frames = (stack or {}).get("callFrames") or []
    if not frames:
        return ""
    f = frames[0]
    return f" (at {f.get('url', '?')}:{f.get('lineNumber', '?')})"


def _http_json(url, timeout=10):
    # never through a proxy: the endpoint is on loopback
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


def _log_tail(path, lines=20):
    try:
        text = Path(path).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


def start_chromium(chromium, profile, log_path, width, height, deadline):
    """Chromium on a free DevTools port: (process, port)."""
    args = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        "--no-first-run",
        "--no-default-browser-check",
        "--hide-scrollbars",
        "about:blank",
    ]
    log = open(log_path, "wb")
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: its helpers die with it
        )
    except OSError as e:
        raise CheckError(f"cannot start {chromium}: {e}") from e
    finally:
        log.close()
    port_file = Path(profile) / "DevToolsActivePort"
    while True:
        if proc.poll() is not None:
            raise CheckError(
                f"Chromium exited ({proc.returncode}) before it opened its DevTools port; "
                f"its output:\n{_log_tail(log_path)}"
            )
        try:
            first = port_file.read_text().splitlines()[0].strip()
            if first:
                return proc, int(first)
        except (OSError, IndexError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise CheckError(
                f"Chromium did not write {port_file} in time; its output:\n{_log_tail(log_path)}"
            )
        time.sleep(0.05)


def page_target(port, deadline):
    """The websocket URL of Chromium's first page."""
    last = None
    while True:
        try:
            for t in _http_json(f"http://127.0.0.1:{port}/json/list"):
                if t.get("type") == "page" and t.get("webSocketDebuggerUrl"):
                    return t["webSocketDebuggerUrl"]
        except (OSError, ValueError) as e:
            last = e
        if time.monotonic() > deadline:
            raise CheckError(f"no page target on DevTools port {port} in time (last error: {last})")
        time.sleep(0.1)


def stop_chromium(proc):
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)  # the group Chromium leads (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def check(args, charts):
    page = Path(args.page).resolve()
    if not page.is_file():
        raise CheckError(f"no page at {page}")
    chromium = shutil.which(args.chromium)
    if chromium is None:
        raise CheckError(f"no Chromium at {args.chromium}")
    page_url = page.as_uri()
    shot = Path(args.screenshot)
    deadline = time.monotonic() + args.timeout
    profile = tempfile.mkdtemp(prefix="page-check-")
    log_path = Path(profile + ".log")  # Chromium's output, for the error messages
    proc = None
    cdp = None
    try:
        proc, port = start_chromium(chromium, profile, log_path, args.width, args.height, deadline)
        found = Findings(page_url)
        cdp = Cdp(page_target(port, deadline), found)
        for domain in ("Network", "Runtime", "Log", "Page"):
            cdp.call(f"{domain}.enable")
        cdp.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": args.width, "height": args.height, "deviceScaleFactor": 1, "mobile": False},
        )
        nav = cdp.call("Page.navigate", {"url": page_url})
        if nav.get("errorText"):
            raise CheckError(f"{page_url} did not load: {nav['errorText']}")
        if not cdp.wait_for("Page.loadEventFired", deadline):
            raise CheckError(
                f"{page_url}: no load event within {args.timeout} s "
                f"(requests so far: {found.requests}; errors so far: {found.errors})"
            )
        # late messages (a failed request's log entry, a timer's error) and web fonts
        cdp.call("Runtime.evaluate", {"expression": "document.fonts.ready.then(() => true)",
                                      "awaitPromise": True})
        cdp.drain()

        result = cdp.call(
            "Runtime.evaluate",
            {
                "expression": f"({CHARTS_JS})({json.dumps(charts)})",
                "returnByValue": True,
                "awaitPromise": True,
            },
        )
        if "exceptionDetails" in result:
            d = result["exceptionDetails"]
            raise CheckError(f"the chart probe failed in the page: "
                             f"{(d.get('exception') or {}).get('description') or d.get('text')}")
        seen = result["result"]["value"]

        metrics = cdp.call("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        clip = {
            "x": 0,
            "y": 0,
            "width": max(1, min(int(size["width"] + 0.999), 16384)),
            "height": max(1, min(int(size["height"] + 0.999), 16384)),
            "scale": 1,
        }
        png = cdp.call(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True, "clip": clip},
            timeout=max(30, deadline - time.monotonic()),
        )
        shot.parent.mkdir(parents=True, exist_ok=True)
        shot.write_bytes(base64.b64decode(png["data"]))
        cdp.drain(quiet=0.2, most=1.0)
        return {
            "requests": found.requests,
            "errors": found.errors,
            "charts": seen["charts"],
            "unexpected_charts": seen["unexpected_charts"],
            "screenshot": str(shot),
            "title": seen["title"],
        }
    finally:
        if cdp is not None:
            cdp.close()
        stop_chromium(proc)
        shutil.rmtree(profile, ignore_errors=True)
        try:
            log_path.unlink()
        except OSError:
            pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chromium", required=True, help="the chromium binary")
    ap.add_argument("--page", required=True, help="the HTML file to render")
    ap.add_argument("--screenshot", required=True, help="where to write the PNG")
    ap.add_argument("--charts", required=True, help="expected data-chart names, comma-separated")
    ap.add_argument("--width", type=int, default=1400, help="viewport width (CSS px)")
    ap.add_argument("--height", type=int, default=2400, help="viewport height (CSS px)")
    ap.add_argument("--timeout", type=float, default=60, help="seconds for the whole check")
    args = ap.parse_args()
    # a SIGTERM (e.g. from a test harness) still stops Chromium and removes its folder
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("page-check: terminated"))
    charts = [c.strip() for c in args.charts.split(",") if c.strip()]
    if not charts:
        ap.error("--charts names no chart")
    try:
        out = check(args, charts)
    except CheckError as e:
        print(f"page-check: {e}", file=sys.stderr)
        return 1
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
