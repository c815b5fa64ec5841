"""Real servers on 127.0.0.1 for the tests: a hostile HTTP server, moto S3, a `ray start --head` node."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import (
    BaseHTTPRequestHandler,
    SimpleHTTPRequestHandler,
    ThreadingHTTPServer,
)
from pathlib import Path

from pipelines.synthetic import serve_directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HostileHandler(SimpleHTTPRequestHandler):
    """Static files plus the web's bad habits, by path:

    /status/<code>          that HTTP status, empty body
    /sleep/<seconds>/<file> the file, after a delay (timeouts)
    /redirect?to=<url>      302 to any URL (e.g. another loopback address the guard must refuse)
    /loop/<n>               an endless redirect chain
    """

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 (http.server naming)
        parsed = urllib.parse.urlparse(self.path)
        parts = [p for p in parsed.path.split("/") if p]
        if parts[:1] == ["status"] and len(parts) == 2:
            self.send_response(int(parts[1]))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if parts[:1] == ["sleep"] and len(parts) >= 3:
            time.sleep(float(parts[1]))
            self.path = "/" + "/".join(parts[2:])
            return super().do_GET()
        if parts[:1] == ["redirect"]:
            target = urllib.parse.parse_qs(parsed.query).get("to", ["/"])[0]
            return self._redirect(target)
        if parts[:1] == ["loop"] and len(parts) == 2:
            return self._redirect(f"/loop/{int(parts[1]) + 1}")
        return super().do_GET()

    def _redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


def start_http_server(root: str | Path, host: str = "127.0.0.1"):
    return serve_directory(root, host=host, handler=HostileHandler)


class RecordingHandler(BaseHTTPRequestHandler):
    """Records every request it receives (``server.seen``) and answers with a body: a broken
    address guard would show up here."""

    def do_GET(self):  # noqa: N802 (http.server naming)
        self.server.seen.append(self.path)
        body = b"secret"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def start_recording_server(host: str = "127.0.0.2") -> ThreadingHTTPServer:
    """A request recorder on another loopback address (the guard's allow-list excludes it)."""
    server = ThreadingHTTPServer((host, 0), RecordingHandler)
    server.seen = []
    threading.Thread(target=server.serve_forever, name="recorder-http", daemon=True).start()
    return server


class RayHead:
    """`ray start --head --block` as a child process, stopped by PID (never `ray stop`).

    Every port is a free one (another head on this machine may hold Ray's fixed defaults, and a
    head without its dashboard agent answers "No available agent"), and token auth is off: the
    node only listens on 127.0.0.1 and the readiness probe must not get a 401.
    """

    def __init__(self, num_cpus: int = 2, env: dict | None = None):
        self.port, self.dashboard_port = free_port(), free_port()
        ports = {name: free_port() for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                 "runtime-env-agent-port", "metrics-export-port",
                                                 "ray-client-server-port", "node-manager-port",
                                                 "object-manager-port")}
        cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
               f"--port={self.port}", f"--dashboard-port={self.dashboard_port}",
               "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
               "--include-dashboard=true", "--disable-usage-stats", *(f"--{k}={v}" for k, v in ports.items())]
        self.proc = subprocess.Popen(cmd, env={**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})},
                                     start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"

    def wait_ready(self, timeout: float = 240) -> None:
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("ray start --head exited early")
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise TimeoutError("Ray head did not come up")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
