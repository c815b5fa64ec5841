"""Headless Chromium for the HTML-page tests: nothing it does leaves this machine."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Everything Chromium might fetch on its own is switched off, and a dead loopback proxy
# catches anything left, so the browser never sends a packet off this machine.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--disable-domain-reliability", "--no-pings",
    "--metrics-recording-only", "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
]


def chromium(args: list[str], user_data_dir: Path, timeout: float = 120) -> str:
    """Run headless Chromium once; returns stdout. Its process group is killed by id on timeout."""
    proc = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return out.decode("utf-8", "replace")
