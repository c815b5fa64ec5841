"""`ray job submit` for any `blip2` command: the repo root ships as the job's ``working_dir``.

The entrypoint is ``<python> -m orchestration.cli <command> <args...>``; inside the job Ray sets
``RAY_ADDRESS``, so the command joins the cluster it was submitted to (``ensure_ray``).
Credentials are never put into the runtime_env (it is stored in the job's record): the
cluster's nodes get theirs from their own environment / instance role.
"""
from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Callable

from orchestration.ray_session import WORKER_ENV

# Never uploaded: the virtualenv, outputs, VCS data and caches (the upload limit is 100 MiB-ish
# and none of these is code the job needs).
EXCLUDES = [".venv", "runs", ".git", "**/__pycache__", ".pytest_cache", "*.egg-info", "benchmarks/out"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def build_submission(command: str, args: list[str], *, python: str = "python",
                     working_dir: str | Path | None = None, env_vars: dict | None = None) -> dict:
    """The keyword arguments of ``JobSubmissionClient.submit_job`` for ``blip2 <command> <args>``."""
    entrypoint = shlex.join([python, "-m", "orchestration.cli", command, *args])
    # WORKER_ENV travels with the job: ensure_ray adds no runtime_env of its own when it joins.
    runtime_env = {"working_dir": str(working_dir or repo_root()), "excludes": list(EXCLUDES),
                   "env_vars": {**WORKER_ENV, **(env_vars or {})}}
    return {"entrypoint": entrypoint, "runtime_env": runtime_env}


def _submit_when_ready(client, submission: dict, wait_s: float = 180.0) -> str:
    """Submit; a freshly started head answers "No available agent" until its job agent registers."""
    deadline = time.time() + wait_s
    while True:
        try:
            return client.submit_job(**submission)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2.0)


def submit(address: str, command: str, args: list[str], *, wait: bool = True, python: str = "python",
           env_vars: dict | None = None, poll_s: float = 1.0, timeout_s: float | None = None,
           echo: Callable[[str], None] = print) -> tuple[str, int]:
    """Submit ``blip2 <command> <args>`` to the job server at ``address`` (dashboard URL).

    Returns (submission id, exit status): 0 once submitted with ``wait=False``; otherwise the
    job's driver exit code after streaming its logs (1 if it failed without one, 124 on timeout).
    """
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id = _submit_when_ready(client, build_submission(command, args, python=python, env_vars=env_vars))
    echo(f"submitted {job_id} to {address}: blip2 {command} {shlex.join(args)}")
    if not wait:
        return job_id, 0
    shown, deadline = 0, None if timeout_s is None else time.time() + timeout_s
    while True:
        info = client.get_job_info(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            echo(logs[shown:].rstrip("\n"))
            shown = len(logs)
        status = str(getattr(info.status, "value", info.status))
        if status in TERMINAL:
            break
        if deadline is not None and time.time() > deadline:
            echo(f"job {job_id} still {status} after {timeout_s:.0f} s; stopping it")
            client.stop_job(job_id)
            return job_id, 124
        time.sleep(poll_s)
    if status == "SUCCEEDED":
        return job_id, 0
    echo(f"job {job_id} {status}: {info.message or ''}".rstrip())
    code = info.driver_exit_code
    return job_id, int(code) if code else 1
