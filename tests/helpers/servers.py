"""Real servers on 127.0.0.1 for the tests: a hostile HTTP server, moto S3, a `ray start --head` node."""
from __future__ import annotations

import os
import signal
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

from orchestration.ray_session import free_port
from pipelines.synthetic import serve_directory


class HostileHandler(SimpleHTTPRequestHandler):
    """Static files plus the web's bad habits, by path:

    /status/<code>[?reason=]  that HTTP status (and reason phrase), empty body
    /sleep/<seconds>/<file>   the file, after a delay (timeouts)
    /redirect?to=<url>        302 to any URL (e.g. another loopback address the guard must refuse)
    /loop/<n>                 an endless redirect chain
    /drip?n=&interval=        Content-Length n, then one byte every interval seconds
    /slowheaders?interval=    the status line, then the headers one byte every interval seconds
    /endless                  200 without Content-Length and a body that never ends
    /lie?claim=&send=&hold=   Content-Length claim, ``send`` bytes, then hold the connection (or close)
    /big/<bytes>              a body of that many bytes with a true Content-Length
    /ratelimit/<id>/<file>?n=&after=  429 with Retry-After ``after`` for the first n requests of id
    /slowredirect/<n>/<file>?delay=  n redirect hops, each answered after ``delay`` seconds
    /robots/<file>?tag=       the file with that X-Robots-Tag header
    /gate/<file>?delay=       the file after a delay; the server counts how many are in flight at once
    /redirectbody?to=<url>    302 to ``to`` with an endless body (counted in ``server.endless_bytes_sent``)
    /chunked?size=<line>      chunked 200 whose chunk-size line is ``size`` (e.g. -1), then endless data (counted too)
    """

    def log_message(self, *args):
        pass

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on purpose (deadline, size cap)
            pass

    def do_GET(self):  # noqa: N802 (http.server naming)
        parsed = urllib.parse.urlparse(self.path)
        parts = [p for p in parsed.path.split("/") if p]
        q = {k: v[0] for k, v in urllib.parse.parse_qs(parsed.query).items()}
        route = getattr(self, f"route_{parts[0]}", None) if parts else None
        if route is not None:
            return route(parts[1:], q)
        return super().do_GET()

    def _serve_file(self, parts, extra_headers=()):
        self.path = "/" + "/".join(parts)
        self._extra = extra_headers
        return super().do_GET()

    def end_headers(self):
        for k, v in getattr(self, "_extra", ()):
            self.send_header(k, v)
        super().end_headers()

    def route_status(self, parts, q):
        self.send_response(int(parts[0]), q.get("reason"))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_sleep(self, parts, q):
        time.sleep(float(parts[0]))
        return self._serve_file(parts[1:])

    def route_redirect(self, parts, q):
        return self._redirect(q.get("to", "/"))

    def route_loop(self, parts, q):
        return self._redirect(f"/loop/{int(parts[0]) + 1}")

    def route_drip(self, parts, q):
        n, interval = int(q.get("n", 100000)), float(q.get("interval", 1))
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        for _ in range(n):
            self.wfile.write(b"\xff")
            self.wfile.flush()
            time.sleep(interval)

    def route_slowheaders(self, parts, q):
        interval = float(q.get("interval", 1))
        self.wfile.write(b"HTTP/1.1 200 OK\r\n")
        for byte in b"X-Slow: " + b"a" * 10000:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(interval)

    def route_endless(self, parts, q):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Connection", "close")
        self.end_headers()
        block = b"\0" * 65536
        while True:
            self.wfile.write(block)

    def route_lie(self, parts, q):
        self.send_response(200)
        self.send_header("Content-Length", q.get("claim", "1000"))
        self.end_headers()
        self.wfile.write(b"\xff" * int(q.get("send", 10)))
        self.wfile.flush()
        time.sleep(float(q.get("hold", 0)))
        self.close_connection = True

    def route_big(self, parts, q):
        n = int(parts[0])
        self.send_response(200)
        self.send_header("Content-Length", str(n))
        self.end_headers()
        self.server.big_bytes_sent = getattr(self.server, "big_bytes_sent", 0)
        for start in range(0, n, 65536):
            chunk = min(65536, n - start)
            self.wfile.write(b"\0" * chunk)
            self.server.big_bytes_sent += chunk

    def route_ratelimit(self, parts, q):
        counts = self.server.__dict__.setdefault("rate_counts", {})
        with _COUNT_LOCK:
            counts[parts[0]] = counts.get(parts[0], 0) + 1
            seen = counts[parts[0]]
        if seen <= int(q.get("n", 1)):
            self.send_response(429)
            if "after" in q:
                self.send_header("Retry-After", q["after"])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        return self._serve_file(parts[1:])

    def route_slowredirect(self, parts, q):
        time.sleep(float(q.get("delay", 1)))
        n = int(parts[0])
        if n == 0:
            return self._serve_file(parts[1:])
        return self._redirect(f"/slowredirect/{n - 1}/{'/'.join(parts[1:])}?delay={q.get('delay', 1)}")

    def route_robots(self, parts, q):
        return self._serve_file(parts, [("X-Robots-Tag", q.get("tag", "noai"))])

    def route_gate(self, parts, q):
        server = self.server
        with _COUNT_LOCK:
            server.gate_now = getattr(server, "gate_now", 0) + 1
            server.gate_max = max(getattr(server, "gate_max", 0), server.gate_now)
        try:
            time.sleep(float(q.get("delay", 0.2)))
        finally:  # the count drops before the response goes out: a client that starts its next request
            with _COUNT_LOCK:  # as soon as it has read this one is never counted twice (a busy machine did)
                server.gate_now -= 1
        return self._serve_file(parts)

    def route_redirectbody(self, parts, q):
        self.send_response(302)
        self.send_header("Location", q.get("to", "/"))
        self.send_header("Connection", "close")
        self.end_headers()
        self._endless()

    def route_chunked(self, parts, q):
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.write(q.get("size", "-1").encode() + b"\r\n")
        self._endless()

    def _endless(self):
        """Writes until the client goes away, counting what the socket took."""
        self.server.endless_bytes_sent = 0
        block = b"\0" * 65536
        while True:
            self.wfile.write(block)
            self.server.endless_bytes_sent += len(block)

    def _redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


_COUNT_LOCK = threading.Lock()


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
        # A job's working_dir package is garbage-collected 600 s after upload unless a job holds it;
        # on a loaded machine the suite's later submits of the same package then find it gone.
        env = {"RAY_RUNTIME_ENV_TEMPORARY_REFERENCE_EXPIRATION_S": "7200", **(env or {})}
        self.proc = subprocess.Popen(cmd, env={**os.environ, "RAY_AUTH_MODE": "disabled", **env},
                                     start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"

    def wait_ready(self, timeout: float = 240) -> None:
        """Until the job server answers and `ray start` has named this head the machine's default
        cluster, its last start-up step: a job's driver finds its cluster through that file."""
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("ray start --head exited early")
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2) as r:
                    if r.status == 200 and self.is_default_cluster():
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError("Ray head did not come up")

    def is_default_cluster(self) -> bool:
        """Whether the machine's default-cluster file (``ray start`` writes it) names this head."""
        from ray._private.utils import read_ray_address

        return (read_ray_address() or "").endswith(f":{self.port}")

    def stop(self) -> None:
        from ray._common.utils import reset_ray_address

        stop_group(self.proc)
        if self.is_default_cluster():
            reset_ray_address()  # killed, it leaves its address behind for the next `auto` to find


def stop_group(proc: subprocess.Popen, grace: float = 2) -> None:
    """SIGTERM a `ray start --head` process group (ray start + GCS + raylet + monitor + fake nodes),
    SIGKILL what is left after ``grace``. A short grace: `ray start --block` shuts its processes
    down one by one on SIGTERM and outlasts even 30 s, and a throwaway test cluster needs no
    graceful end (its children have had the SIGTERM too)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group (GCS, monitor)
    except ProcessLookupError:
        pass
    proc.wait(10)


def pids_running(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (Ray names a task's worker process ``ray::<task name>``)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                out.append(int(entry.name))
    return out
