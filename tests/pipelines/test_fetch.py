"""One fetch in bounded time and memory, against a loopback server that misbehaves on purpose."""
from __future__ import annotations

import email.message
import email.utils
import threading
import time

import pytest

from pipelines.fetch import Fetcher, FetchLimits, host_of, normalize_url, opted_out, retry_after_seconds
from pipelines.netguard import Guard, Policy

LIMITS = FetchLimits(timeout=1.0, deadline=1.5, max_bytes=1 << 20)


@pytest.fixture(scope="module")
def fetcher():
    return Fetcher(Policy(("127.0.0.1",)), LIMITS)



def timed(fetcher, url):
    start = time.monotonic()
    got = fetcher.fetch(url)
    return got, time.monotonic() - start


@pytest.mark.parametrize("path", [
    "/drip?n=100000&interval=0.2",           # a body that never finishes
    "/slowheaders?interval=0.2",             # headers that never finish
    "/lie?claim=100000&send=10&hold=30",     # a Content-Length that promises more than comes
    "/slowredirect/5/{file}?delay=0.6",      # a redirect chain that slows down
])
def test_slow_servers_end_as_timeout_within_the_deadline(fetcher, http_server, corpus, path):
    got, took = timed(fetcher, http_server.base_url + path.format(file=corpus[1][0].file))
    assert got.status == "timeout" and "download.deadline" in got.error
    assert took < LIMITS.deadline + 0.5


def test_a_slow_drip_in_many_threads_ends_for_each_of_them(fetcher, http_server):
    results = []
    threads = [threading.Thread(target=lambda: results.append(timed(fetcher, f"{http_server.base_url}/drip?n=9999&interval=0.3")))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 6 and all(g.status == "timeout" and took < LIMITS.deadline + 0.5 for g, took in results)


def test_bodies_over_the_cap_are_refused_early_or_abandoned(fetcher, http_server):
    got, took = timed(fetcher, f"{http_server.base_url}/endless")
    assert got.status == "too_large" and "max_bytes" in got.error and got.data is None and took < LIMITS.deadline
    http_server.big_bytes_sent = 0
    got = fetcher.fetch(f"{http_server.base_url}/big/{50 << 20}")
    assert got.status == "too_large" and got.error.startswith("Content-Length 52428800 >")
    time.sleep(0.2)
    assert http_server.big_bytes_sent < 10 << 20  # refused from the header: the body was never read
    assert fetcher.fetch(f"{http_server.base_url}/big/{LIMITS.max_bytes}").status == "ok"


def test_a_redirect_body_is_dropped_unread(fetcher, http_server, corpus):
    got, took = timed(fetcher, f"{http_server.base_url}/redirectbody?to=/{corpus[1][0].file}")
    assert got.status == "ok" and got.data == (corpus[0] / corpus[1][0].file).read_bytes()
    assert took < LIMITS.deadline
    assert http_server.endless_bytes_sent < 16 << 20  # what socket buffers take; read, it was GBs


def test_a_negative_chunk_size_cannot_read_past_the_cap(fetcher, http_server):
    got, took = timed(fetcher, f"{http_server.base_url}/chunked?size=-1")
    assert got.status == "network_error" and took < LIMITS.deadline
    assert http_server.endless_bytes_sent < 16 << 20


def test_a_body_shorter_than_announced_is_a_network_error(fetcher, http_server):
    got = fetcher.fetch(f"{http_server.base_url}/lie?claim=1000&send=10&hold=0")
    assert got.status == "network_error" and "shorter than announced" in got.error


def test_rate_limits_carry_the_servers_retry_after(fetcher, http_server, corpus):
    got = fetcher.fetch(f"{http_server.base_url}/ratelimit/a/{corpus[1][0].file}?n=1&after=3")
    assert (got.status, got.kind, got.retry_after) == ("rate_limited", "429", 3.0)
    assert fetcher.fetch(f"{http_server.base_url}/ratelimit/a/{corpus[1][0].file}?n=1&after=3").status == "ok"
    assert fetcher.fetch(f"{http_server.base_url}/status/503").status == "rate_limited"
    got = fetcher.fetch(f"{http_server.base_url}/ratelimit/sup/{corpus[1][0].file}?n=1&after=%C2%B2")  # byte \xb2
    assert (got.status, got.retry_after) == ("rate_limited", None)


def test_statuses_come_from_the_response_not_from_its_text(fetcher, http_server):
    got = fetcher.fetch(f"{http_server.base_url}/status/500?reason=blocked:%20spoofed%20reason")
    assert (got.status, got.kind) == ("http_error", "500")
    assert fetcher.fetch(f"{http_server.base_url}/status/404?reason=redirect_error:%20x").status == "http_error"


def test_x_robots_tag_opt_outs_are_honoured(fetcher, http_server, corpus):
    f = corpus[1][0].file
    assert fetcher.fetch(f"{http_server.base_url}/robots/{f}?tag=noai").status == "opted_out"
    assert fetcher.fetch(f"{http_server.base_url}/robots/{f}?tag=img2dataset:%20noimageai").status == "opted_out"
    assert fetcher.fetch(f"{http_server.base_url}/robots/{f}?tag=blip2-pipeline:%20noindex").status == "opted_out"
    assert fetcher.fetch(f"{http_server.base_url}/robots/{f}?tag=otherbot:%20noai").status == "ok"


def test_refusals_are_classified_and_never_reach_the_target(fetcher, http_server, recorder):
    r = f"http://127.0.0.2:{recorder.server_address[1]}"
    cases = {f"{r}/x.jpg": "loopback", f"{http_server.base_url}/redirect?to={r}/y.jpg": "loopback",
             "ftp://127.0.0.1/a.jpg": "scheme", "http://169.254.169.254/latest/meta-data": "link-local",
             f"http://１２７.0.0.2:{recorder.server_address[1]}/fullwidth.jpg": "loopback"}
    for url, kind in cases.items():
        got = fetcher.fetch(url)
        assert (got.status, got.kind) == ("blocked", kind), url
    assert recorder.seen == []


def test_user_info_is_never_sent_and_the_host_still_answers(fetcher, http_server, corpus):
    url = http_server.base_url.replace("http://", "http://user:secret@") + f"/{corpus[1][1].file}"
    got = fetcher.fetch(url)
    assert got.status == "ok" and got.data == (corpus[0] / corpus[1][1].file).read_bytes()


def test_normalize_url():
    assert normalize_url("http://bücher.example/ä b.jpg?q=é#frag") == (
        "http://xn--bcher-kva.example/%C3%A4%20b.jpg?q=%C3%A9", None)
    assert normalize_url("http://user:pw@Host.Example:8080/a") == ("http://host.example:8080/a", None)
    assert normalize_url("http://[::1]:80/x")[0] == "http://[::1]:80/x"
    assert normalize_url("http:///nohost")[1] == "URL has no host"
    assert normalize_url("http://h:99999/")[1].startswith("malformed URL")
    assert normalize_url("ftp://x/y") == ("ftp://x/y", None)  # the guard refuses it, as blocked
    assert normalize_url("http://" + "ä" * 70 + ".example/")[1].startswith("host name cannot be IDNA-encoded")
    assert host_of("http://u:p@Host.example:81/x") == "host.example:81"


def test_fullwidth_and_idna_hosts_are_judged_after_normalising():
    guard = Guard(Policy(("127.0.0.1",)))
    url, _ = normalize_url("http://１２７.0.0.2/x")
    assert url == "http://127.0.0.2/x" and guard.refusal(url) == ("127.0.0.2 is loopback", "loopback")


def test_opted_out_reads_x_robots_tag_as_img2dataset_does():
    from img2dataset.downloader import is_disallowed

    directives = {"noai", "noimageai", "noindex", "noimageindex"}
    values = [["noai"], ["NoImageAI"], ["noindex, nofollow"], ["img2dataset: noai"], ["otherbot: noai"],
              ["img2dataset: nofollow"], ["all"], [], ["otherbot: noai", "img2dataset: noimageindex"],
              ["unavailable_after: 25 Jun 2010 15:00:00 PST"]]
    for tags in values:
        headers = email.message.Message()
        for t in tags:
            headers["X-Robots-Tag"] = t
        assert opted_out(headers, ("img2dataset",), directives) == is_disallowed(headers, "img2dataset", directives), tags
    spaced = email.message.Message()
    spaced["X-Robots-Tag"] = "img2dataset : noai"  # img2dataset compares the token unstripped; we also honour this
    assert opted_out(spaced, ("img2dataset",), directives)


def test_retry_after_seconds():
    assert retry_after_seconds("7") == 7.0 and retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    now = time.time()
    assert 59 <= retry_after_seconds(email.utils.formatdate(now + 60, usegmt=True), now) <= 61
    # digits isdigit() accepts that float() refuses or that are not ASCII; a number that is inf; a bad date
    for value in ("²", "\u0663", "1" * 400, "Fri, 31 Dec 99999 23:59:59 GMT"):
        assert retry_after_seconds(value) is None, value

