"""The address guard: downloads never reach private, loopback, link-local or non-HTTP(S) targets.

Web-scale URL lists are hostile: a URL (or a redirect) may point at the cloud metadata
service (169.254.169.254), a database on the private network or ``file:///etc/passwd``.
The guard checks the *resolved* IP at connect time and connects to exactly the address it
checked, so a DNS answer that changes between check and connect (rebinding) cannot slip
through, and every redirect hop opens a new, equally guarded connection.

``guarded_opener(policy)`` builds a urllib opener from nothing but HTTP/HTTPS handlers (no
file/ftp/data handlers, no environment proxies) whose connections resolve, classify and
connect through :meth:`Guard.create_connection`; ``pipelines.fetch`` downloads through it.
Every refusal carries a ``kind`` (``loopback``, ``private``, ``scheme``, ...) so callers count
refusals by class without reading message text that a server may have chosen.
"""
from __future__ import annotations

import ipaddress
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

ALLOWED_SCHEMES = ("http", "https")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class BlockedAddress(OSError):
    """The guard refused a target; ``kind`` is the class of the refusal (see :func:`classify`)."""

    def __init__(self, reason: str, kind: str = "other"):
        super().__init__(f"blocked: {reason}")
        self.kind = kind


class RedirectLimit(urllib.error.URLError):
    """Too many redirects, or a redirect loop."""

    def __init__(self, reason: str):
        super().__init__(f"redirect_error: {reason}")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, Teredo client), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


_SPECIAL_V4 = (ipaddress.ip_network("192.0.0.0/24"), ipaddress.ip_network("192.88.99.0/24"))


def classify(ip: str | IPAddress) -> str | None:
    """Why an address must not be contacted, or None if it is a public unicast address.

    >>> classify("169.254.169.254")
    'link-local'
    >>> classify("93.184.216.34") is None
    True
    """
    try:
        addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    except ValueError:
        return f"not an IP address: {ip!r}"
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id:
            return "scoped IPv6 address"
        inner = _embedded_ipv4(addr)
        if inner is not None:
            reason = classify(inner)
            return f"{reason} (embedded in {addr})" if reason else None
    # Most specific reason first; `is_global` is the catch-all (shared 100.64/10, TEST-NETs, ...).
    for reason, hit in (
        ("unspecified", addr.is_unspecified),
        ("loopback", addr.is_loopback),
        ("link-local", addr.is_link_local),
        ("multicast", addr.is_multicast),
        ("reserved", addr.is_reserved),
        ("private", addr.is_private),
        ("site-local", isinstance(addr, ipaddress.IPv6Address) and addr.is_site_local),
        # IETF protocol assignments and 6to4 relays: CPython calls a few of these global
        ("not globally routable", not addr.is_global or any(addr in n for n in _SPECIAL_V4 if addr.version == 4)),
    ):
        if hit:
            return reason
    return None


@dataclass(frozen=True)
class Policy:
    """What the guard lets through. ``allow_hosts`` entries are host names, IPs or CIDRs
    (``127.0.0.1``, ``10.0.0.0/8``, ``localhost``); an allowed *name* trusts whatever it resolves to."""

    allow_hosts: tuple[str, ...] = ()
    max_redirects: int = 5
    _networks: tuple = field(default=(), init=False, repr=False, compare=False)
    _names: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self):
        nets, names = [], set()
        for entry in self.allow_hosts:
            try:
                nets.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                names.add(entry.strip().lower().rstrip("."))
        object.__setattr__(self, "_networks", tuple(nets))
        object.__setattr__(self, "_names", frozenset(names))

    def ip_allowed(self, ip: IPAddress) -> bool:
        return any(ip.version == n.version and ip in n for n in self._networks)

    def name_allowed(self, host: str) -> bool:
        return host.lower().rstrip(".") in self._names


def kind_of(reason: str) -> str:
    """The class of a :func:`classify` reason: its first words, without the embedding note."""
    return reason.split(" (embedded", 1)[0]


class Guard:
    """Checks URLs and opens guarded connections under one :class:`Policy`.

    ``on_connect(sock)`` is called with every socket the guard connects (the fetcher uses it
    to enforce a wall-clock deadline on the whole request)."""

    def __init__(self, policy: Policy, on_connect=None):
        self.policy = policy
        self.on_connect = on_connect

    def check_ip(self, ip: str | IPAddress) -> str | None:
        addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
        if self.policy.ip_allowed(addr):
            return None
        return classify(addr)

    def refusal(self, url: str | None) -> tuple[str, str] | None:
        """(reason, kind) of a refusal from the URL alone (scheme, missing host, literal-IP
        host), or None. Host *names* are judged later, on the addresses they resolve to."""
        if not url:
            return "empty URL", "malformed"
        try:
            parts = urllib.parse.urlsplit(url)
            host = parts.hostname
        except ValueError as e:
            return f"malformed URL ({e})", "malformed"
        if parts.scheme.lower() not in ALLOWED_SCHEMES:
            return f"scheme {parts.scheme or '(none)'!r} is not http(s)", "scheme"
        if not host:
            return "URL has no host", "malformed"
        if self.policy.name_allowed(host):
            return None
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None
        reason = self.check_ip(ip)
        return (f"{host} is {reason}", kind_of(reason)) if reason else None

    def check_url(self, url: str | None) -> str | None:
        """The reason :meth:`refusal` gives, or None."""
        refused = self.refusal(url)
        return refused[0] if refused else None

    def create_connection(self, address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):
        """Drop-in for ``socket.create_connection`` that resolves, checks every address and
        connects only to an address it has just checked."""
        host, port = address
        trusted_name = self.policy.name_allowed(host)
        refused, kinds, last_error = [], [], None
        for family, type_, proto, _, sockaddr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
            reason = None if trusted_name else self.check_ip(sockaddr[0])
            if reason:
                refused.append(f"{sockaddr[0]} is {reason}")
                kinds.append(kind_of(reason))
                continue
            sock = socket.socket(family, type_, proto)
            try:
                if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                if self.on_connect is not None:
                    self.on_connect(sock)
                return sock
            except OSError as e:
                sock.close()
                last_error = e
        if last_error is not None:
            raise last_error
        raise BlockedAddress(f"{host} resolves only to refused addresses: {', '.join(refused)}", kinds[0])


def _guarded(conn_class, guard: Guard):
    """An http.client connection factory whose sockets come from the guard."""

    def factory(*args, **kwargs):
        conn = conn_class(*args, **kwargs)
        conn._create_connection = guard.create_connection  # used by HTTP(S)Connection.connect
        return conn

    return factory


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, guard: Guard):
        super().__init__()
        self.guard = guard

    def http_open(self, req):
        import http.client

        return self.do_open(_guarded(http.client.HTTPConnection, self.guard), req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, guard: Guard):
        super().__init__()
        self.guard = guard

    def https_open(self, req):
        import http.client

        return self.do_open(_guarded(http.client.HTTPSConnection, self.guard), req,
                            context=self._context)


class _GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Re-checks every redirect target and ends loops with a distinguishable error."""

    def __init__(self, guard: Guard):
        super().__init__()
        self.guard = guard
        self.max_redirections = guard.policy.max_redirects

    def http_error_302(self, req, fp, code, msg, headers):
        # Checked before urllib's own scheme test, which would report a plain HTTP error.
        location = headers.get("location") or headers.get("uri")
        if location:
            newurl = urllib.parse.urljoin(req.full_url, location)
            refused = self.guard.refusal(newurl)
            if refused:
                raise urllib.error.URLError(BlockedAddress(f"redirect to {newurl}: {refused[0]}", refused[1]))
        # urllib reads the 3xx body whole (no cap) before following; it is never needed, so drop
        # it unread (requests go out with Connection: close, so nothing reuses the connection).
        fp.close()
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        visited = getattr(req, "redirect_dict", {})
        if len(visited) >= self.max_redirections or visited.get(newurl, 0) >= self.max_repeats:
            raise RedirectLimit(f"more than {self.max_redirections} redirects or a loop at {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def guarded_opener(policy: Policy, on_connect=None) -> urllib.request.OpenerDirector:
    """An opener that speaks only guarded HTTP/HTTPS (no file/ftp/data, no env proxies)."""
    guard = Guard(policy, on_connect)
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler({}), urllib.request.UnknownHandler(),
                    _GuardedHTTPHandler(guard), _GuardedHTTPSHandler(guard),
                    urllib.request.HTTPDefaultErrorHandler(), _GuardedRedirectHandler(guard),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener
