"""A real browser for the tests: headless Chromium (Debian's chromium)
driven through the Chrome DevTools Protocol over its websocket, with only
Python's standard library (a websocket client of a few lines: text frames,
masked as a client must, no extensions). Chromium is started on a profile
and a debugging port of its own (port 0: the kernel picks; Chromium writes
it to DevToolsActivePort), talks only to the URLs the test gives it, and is
stopped by PID.

    with Browser() as b:
        b.navigate("http://127.0.0.1:9187/")
        n = b.evaluate("document.querySelectorAll('tr').length")
        b.screenshot("page.png")
"""
import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request

from harness import skip, wait_until


def chromium_binary():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class _WebSocket:
    def __init__(self, url, timeout=30):
        assert url.startswith("ws://"), url
        hostport, _, path = url[5:].partition("/")
        host, _, port = hostport.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            assert chunk, "the browser closed the websocket handshake"
            head += chunk
        head, _, self.buf = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head[:200]

    def _exact(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 16)
            assert chunk, "the browser closed the websocket"
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, text):
        data = text.encode()
        n = len(data)
        if n < 126:
            head = struct.pack("!BB", 0x81, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x81, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
        mask = os.urandom(4)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def recv(self):
        """One whole text message (fragments joined; pings answered)."""
        parts = []
        while True:
            b0, b1 = self._exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._exact(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._exact(8))[0]
            mask = self._exact(4) if b1 & 0x80 else None
            data = self._exact(n)
            if mask:
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
            op = b0 & 0x0F
            if op == 0x9:  # ping
                self.sock.sendall(struct.pack("!BB", 0x8A, 0x80 | len(data)) + b"\0\0\0\0" + data)
                continue
            if op == 0x8:
                raise ConnectionError("the browser closed the websocket")
            parts.append(data)
            if b0 & 0x80:
                return b"".join(parts).decode()

    def close(self):
        self.sock.close()


class Browser:
    """Headless Chromium with one page, driven over CDP."""

    def __init__(self, width=1280, height=900):
        binary = chromium_binary()
        if binary is None:
            skip("chromium not installed (tools/install-deps --test)")
        self.profile = tempfile.mkdtemp(prefix="sluice-chromium-")
        args = [binary, "--headless=new", "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
                "--no-first-run", "--no-default-browser-check", "--disable-gpu",
                "--disable-extensions", "--disable-background-networking", "--disable-sync",
                "--disable-component-update", "--metrics-recording-only", "--mute-audio",
                "--disable-dev-shm-usage", "--password-store=basic", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses root with its sandbox
        self.log = open(os.path.join(self.profile, "chromium.log"), "wb")
        # Its own temporary files (the singleton's socket directory,
        # org.chromium.Chromium.*) in the profile, removed with it: in
        # /tmp, two were left behind by every run.
        tmp = os.path.join(self.profile, "tmp")
        os.mkdir(tmp)
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=dict(os.environ, TMPDIR=tmp))
        self.ws = None
        self.next_id = 0
        try:
            port_file = os.path.join(self.profile, "DevToolsActivePort")
            wait_until(lambda: os.path.exists(port_file) and open(port_file).read().count("\n") >= 1
                       or self.proc.poll() is not None, 60, "chromium's debugging port")
            if self.proc.poll() is not None:
                raise AssertionError(f"chromium exited {self.proc.returncode}: {self.tail_log()}")
            port = int(open(port_file).read().split("\n")[0])
            pages = wait_until(lambda: [t for t in self._targets(port) if t["type"] == "page"],
                               30, "chromium's first page")
            self.ws = _WebSocket(pages[0]["webSocketDebuggerUrl"])
            self.call("Page.enable")
            self.call("Runtime.enable")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _targets(port):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            return json.loads(r.read())

    def tail_log(self):
        self.log.flush()
        with open(os.path.join(self.profile, "chromium.log"), "rb") as f:
            return f.read()[-2000:].decode(errors="replace")

    def call(self, method, **params):
        self.next_id += 1
        mine = self.next_id
        self.ws.send(json.dumps({"id": mine, "method": method, "params": params}))
        while True:  # events arrive between answers: skipped
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mine:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def navigate(self, url):
        r = self.call("Page.navigate", url=url)
        assert not r.get("errorText"), f"navigate {url}: {r['errorText']}"
        wait_until(lambda: self.evaluate("document.readyState") == "complete", 30,
                   f"{url} to load")

    def evaluate(self, expr):
        """The value of a JavaScript expression (JSON-serialisable)."""
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True)
        if "exceptionDetails" in r:
            raise AssertionError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def screenshot(self, path):
        r = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(r["data"]))

    def close(self):
        if self.ws is not None:
            self.ws.close()
            self.ws = None
        if self.proc.poll() is None:
            # Its renderers and helpers are in its session: stop them all.
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
