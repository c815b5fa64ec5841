"""One HTTP(S) fetch in bounded time and memory, through the address guard.

Why not img2dataset's ``download_image``: it reads ``r.read()`` whole (no size cap) under
urllib's per-socket-operation timeout, which never fires while a server trickles one byte
at a time. Here every attempt has a wall-clock **deadline** covering connect, TLS, headers,
body and every redirect hop: each socket the guard connects is registered with a
:class:`Watchdog` that shuts it down when the deadline passes, so a slow-drip header or
body ends as ``timeout`` instead of holding a thread for ever. The body is read in chunks
and abandoned past ``max_bytes``; a ``Content-Length`` above it is refused before reading.

Kept from img2dataset: its User-Agent string and its X-Robots-Tag rules (those of
``img2dataset.downloader.is_disallowed``, re-written in :func:`opted_out` because importing
img2dataset costs every worker process seconds; a test holds the two equal), honoured for
img2dataset's token as well as ours, so a site that opted out of img2dataset is left alone
here too. Outcomes are download-contract statuses taken from exception *types* (never from
text a server controls).
"""
from __future__ import annotations

import email.utils
import heapq
import http.client
import itertools
import math
import socket
import string
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from pipelines.netguard import BlockedAddress, Guard, Policy, RedirectLimit, guarded_opener

USER_AGENT = ("Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0 "
              "(compatible; {token}; +https://github.com/rom1504/img2dataset)")
ROBOTS_TOKENS = ("img2dataset",)        # honoured besides our own token
DISALLOWED_DIRECTIVES = {"noai", "noimageai", "noindex", "noimageindex"}  # img2dataset's defaults
CHUNK_BYTES = 1 << 20                  # the most one read of a body may take
_URL_SAFE = string.punctuation         # keep reserved characters and existing %-escapes


@dataclass(frozen=True)
class FetchLimits:
    timeout: float = 10.0               # each socket operation
    deadline: float = 30.0              # the whole attempt, redirects included
    max_bytes: int = 32 << 20
    user_agent_token: str = "blip2-pipeline"


@dataclass(frozen=True)
class Fetched:
    status: str                         # "ok" or a download status
    data: bytes | None = None
    error: str | None = None
    kind: str | None = None             # blocked: the refusal class; http_error/rate_limited: the code
    retry_after: float | None = None    # rate_limited: seconds the server asked us to wait


def normalize_url(url: str) -> tuple[str | None, str | None]:
    """(URL to request, problem). Host names become IDNA (punycode), user info is dropped (never
    sent), non-ASCII in path and query is percent-encoded, the fragment goes. Non-HTTP(S)
    URLs are returned as they are: the guard refuses them."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        host, port = parts.hostname, parts.port
    except ValueError as e:
        return None, f"malformed URL ({e})"
    if not parts.scheme:
        return None, "URL has no scheme (a relative path needs download.url_prefix)"
    if parts.scheme.lower() not in ("http", "https"):
        return url, None
    if not host:
        return None, "URL has no host"
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as e:
            return None, f"host name cannot be IDNA-encoded ({e})"
    if any(c.isspace() or ord(c) < 32 for c in host):
        return None, "host name holds whitespace or control characters"
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    path = urllib.parse.quote(parts.path, safe=_URL_SAFE) or "/"
    query = urllib.parse.quote(parts.query, safe=_URL_SAFE)
    return urllib.parse.urlunsplit((parts.scheme.lower(), netloc, path, query, "")), None


def opted_out(headers, tokens: tuple[str, ...], directives=DISALLOWED_DIRECTIVES) -> bool:
    """Whether an ``X-Robots-Tag`` header forbids the use: a directive for everyone
    (``noai``) or for one of ``tokens`` (``img2dataset: noimageai``)."""
    for value in headers.get_all("X-Robots-Tag", []) or []:
        token, sep, rest = value.partition(":")
        addressed = token.strip().lower() if sep else None
        if addressed is not None and addressed not in tokens:
            continue
        if any(d.strip().lower() in directives for d in (rest if sep else value).split(",")):
            return True
    return False


def host_of(url: str | None) -> str:
    """``host[:port]`` of a URL (politeness is per host), or "" when it has none."""
    try:
        return urllib.parse.urlsplit(url or "").netloc.rpartition("@")[2].lower()
    except ValueError:
        return ""


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header (delta-seconds or HTTP-date) in seconds, or None."""
    if not value:
        return None
    value = value.strip()
    # A server's header is data: "²".isdigit() is true and float() refuses it; "1"*400 is inf.
    try:
        if value.isascii() and value.isdigit():
            seconds = float(value)
        else:
            when = email.utils.parsedate_to_datetime(value)
            seconds = max(0.0, when.timestamp() - (time.time() if now is None else now))
    except (TypeError, ValueError, OverflowError):
        return None
    return seconds if math.isfinite(seconds) else None


class _Watch:
    __slots__ = ("deadline", "sock", "done")

    def __init__(self, deadline: float, sock: socket.socket):
        self.deadline, self.sock, self.done = deadline, sock, False


class Watchdog:
    """Shuts down sockets whose deadline passed. It holds a duplicate of each socket: a shutdown
    acts on the connection itself, so a read blocked in another thread (TLS included) returns."""

    def __init__(self):
        self._cond = threading.Condition()
        self._heap: list = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, sock: socket.socket, deadline: float) -> _Watch:
        w = _Watch(deadline, sock.dup())
        with self._cond:
            earliest = not self._heap or deadline < self._heap[0][0]
            heapq.heappush(self._heap, (deadline, next(self._seq), w))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fetch-watchdog", daemon=True)
                self._thread.start()
            if earliest:  # the watchdog sleeps until the earliest deadline: wake it only to move that
                self._cond.notify()
        return w

    def release(self, w: _Watch) -> None:
        with self._cond:
            if not w.done:
                w.done = True
                w.sock.close()

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                _, _, w = heapq.heappop(self._heap)
                w.done = True
                try:
                    w.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                w.sock.close()


class Fetcher:
    """Fetches URLs through a guarded opener; thread-safe (one per download task)."""

    def __init__(self, policy: Policy, limits: FetchLimits):
        self.limits = limits
        self.watchdog = Watchdog()
        self._current = threading.local()
        self.opener = guarded_opener(policy, on_connect=self._on_connect)
        self.guard = Guard(policy)
        self.user_agent = USER_AGENT.format(token=limits.user_agent_token)
        self.tokens = tuple(dict.fromkeys((limits.user_agent_token.lower(), *ROBOTS_TOKENS)))

    def _on_connect(self, sock: socket.socket) -> None:
        deadline = getattr(self._current, "deadline", None)
        if deadline is None:
            return
        sock.settimeout(max(0.001, min(self.limits.timeout, deadline - time.monotonic())))
        self._current.watches.append(self.watchdog.watch(sock, deadline))

    def fetch(self, url: str) -> Fetched:
        """One attempt at ``url`` (already a decoded string); never raises."""
        target, problem = normalize_url(url)
        if problem:
            return Fetched("invalid_url", error=problem)
        refused = self.guard.refusal(target)
        if refused:
            return Fetched("blocked", error=f"blocked: {refused[0]}", kind=refused[1])
        deadline = time.monotonic() + self.limits.deadline
        self._current.deadline, self._current.watches = deadline, []
        try:
            return self._fetch(target, deadline)
        finally:
            for w in self._current.watches:
                self.watchdog.release(w)
            self._current.deadline, self._current.watches = None, []

    def _fetch(self, target: str, deadline: float) -> Fetched:
        limits = self.limits
        try:
            request = urllib.request.Request(target, headers={"User-Agent": self.user_agent})
            with self.opener.open(request, timeout=max(0.001, min(limits.timeout, deadline - time.monotonic()))) as r:
                if opted_out(r.headers, self.tokens):
                    return Fetched("opted_out", error="X-Robots-Tag forbids this use")
                length = r.headers.get("Content-Length")
                length = int(length) if length and length.strip().isdigit() else None
                if length is not None and length > limits.max_bytes:
                    return Fetched("too_large", error=f"Content-Length {length} > max_bytes {limits.max_bytes}")
                # readinto a fixed buffer, never read(n): http.client takes a chunk size of -1 as
                # "read to EOF" in a single read(n) call, past any cap checked after it returns.
                want = limits.max_bytes + 1 if length is None else length
                buf = memoryview(bytearray(min(CHUNK_BYTES, want)))
                chunks, total = [], 0
                while total < want:
                    if time.monotonic() >= deadline:
                        return _timeout(limits)
                    n = r.readinto(buf[:min(len(buf), want - total)])
                    if not n:
                        break
                    total += n
                    if total > limits.max_bytes:
                        return Fetched("too_large", error=f"body over max_bytes {limits.max_bytes}")
                    chunks.append(bytes(buf[:n]))
                data = b"".join(chunks)
            if time.monotonic() >= deadline:  # the watchdog's shutdown reads as end of body
                return _timeout(limits)
            if length is not None and len(data) < length:
                return Fetched("network_error", error=f"body shorter than announced ({len(data)} of {length} bytes)")
            return Fetched("ok", data=data)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code in (429, 503):
                return Fetched("rate_limited", error=f"HTTP {e.code}", kind=str(e.code),
                               retry_after=retry_after_seconds(e.headers.get("Retry-After") if e.headers else None))
            return Fetched("http_error", error=f"HTTP {e.code}", kind=str(e.code))
        except RedirectLimit as e:
            return Fetched("redirect_error", error=str(e.reason))
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, BlockedAddress):
                return Fetched("blocked", error=str(reason), kind=reason.kind)
            if isinstance(reason, (socket.timeout, TimeoutError)) or time.monotonic() >= deadline:
                return _timeout(limits)
            return Fetched("network_error", error=f"{type(reason).__name__}: {reason}"[:500])
        except BlockedAddress as e:
            return Fetched("blocked", error=str(e), kind=e.kind)
        except (socket.timeout, TimeoutError):
            return _timeout(limits)
        except http.client.IncompleteRead as e:
            if time.monotonic() >= deadline:
                return _timeout(limits)
            return Fetched("network_error", error=f"body shorter than announced ({len(e.partial)} bytes read)")
        except (OSError, http.client.HTTPException, ValueError) as e:
            if time.monotonic() >= deadline:
                return _timeout(limits)
            return Fetched("network_error", error=f"{type(e).__name__}: {e}"[:500])


def _timeout(limits: FetchLimits) -> Fetched:
    return Fetched("timeout", error=f"no complete response within {limits.deadline:g} s "
                                    f"(download.deadline; {limits.timeout:g} s per socket operation)")
