"""A Ray cluster on Ray's fake multi-node provider (``RAY_FAKE_CLUSTER=1``): a real head whose
autoscaler launches and terminates worker nodes (real raylets) on this machine.

* :func:`fake_twin` turns ``ray_cluster.yaml``'s node types into a fake-provider config;
* :class:`FakeCluster` starts the head in its own process group and temp dir and stops it by
  PID (never ``ray stop``: other Ray sessions run on this machine);
* :func:`kill_node` SIGKILLs one node's raylet and everything it started, like a lost VM.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from orchestration.ray_session import free_port
from tests.helpers.servers import pids_running, stop_group

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "ray_cluster.yaml"

DEFAULT_RESOURCES = {"cpu_worker": {"CPU": 1}, "gpu_worker": {"CPU": 1, "GPU": 8}}


def load_cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def fake_twin(cfg: dict, gcs_address: str, resources: dict | None = None, max_workers: int = 1,
              head_cpus: int = 1, idle_timeout_minutes: float = 0.1, min_workers: int = 0) -> dict:
    """The same node types on Ray's fake provider: resources spelled out (logical GPUs), tiny sizes.
    ``resources`` maps a node type to its resources; only those types are kept."""
    resources = resources or DEFAULT_RESOURCES
    types = {name: {"resources": resources[name], "node_config": {}, "min_workers": min_workers,
                    "max_workers": max_workers,
                    **({"idle_timeout_s": 5} if "idle_timeout_s" in t else {})}
             for name, t in cfg["available_node_types"].items() if name in resources}
    types["ray.head.default"] = {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0}
    return {"cluster_name": cfg["cluster_name"] + "-fake", "max_workers": max_workers * len(resources),
            "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes,
            "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "disable_launch_config_check": True,
                         "disable_node_updaters": True, "use_node_id_as_ip": True},
            "auth": {"ssh_user": "ubuntu"}, "available_node_types": types, "head_node_type": "ray.head.default",
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": []}


class FakeCluster:
    """``RAY_FAKE_CLUSTER=1 ray start --head --block`` with a fake-provider autoscaling config.

    ``twin`` builds the config from the GCS address (see :func:`fake_twin`). ``env`` is added to
    the head's environment, which the GCS, the autoscaler (monitor) and the fake nodes inherit.
    """

    def __init__(self, twin, workdir: Path, head_cpus: int = 1, env: dict | None = None):
        self.port = free_port()
        self.workdir = Path(workdir)
        self.address = f"127.0.0.1:{self.port}"
        config = Path(workdir) / "fake_cluster.yaml"
        config.write_text(yaml.safe_dump(twin(self.address)))
        # Own (short: unix socket paths) temp dir, so this cluster never becomes the machine's
        # default `ray.init()` address, and its processes can be found by that path.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rayfake-", dir="/tmp"))
        self.env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                    "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", **(env or {})}
        self.env.pop("RAY_ADDRESS", None)
        ray_bin = str(Path(sys.executable).with_name("ray"))
        self.proc = subprocess.Popen(
            [ray_bin, "start", "--head", "--block", f"--port={self.port}", f"--num-cpus={head_cpus}",
             "--node-ip-address=127.0.0.1", "--include-dashboard=false", f"--temp-dir={self.temp_dir}",
             f"--autoscaling-config={config}", "--disable-usage-stats"],
            env=self.env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 90) -> None:
        """Until the autoscaler (monitor) has started: from then on demand launches nodes."""
        deadline = time.time() + timeout
        while not list(self.temp_dir.glob("session_*/logs/monitor*")):
            assert self.proc.poll() is None and time.time() < deadline, "fake-provider head did not start"
            time.sleep(0.5)

    def logs(self) -> Path:
        return next(self.temp_dir.glob("session_*/logs"), self.temp_dir)

    def stop(self) -> None:
        stop_group(self.proc)
        # fake nodes a crash left outside the group: every process names this temp dir
        for pid in pids_running(str(self.temp_dir)):
            _sigkill(pid)
        # the autoscaler's and Ray Train's view of the run, for a failed test to show (the temp dir goes)
        for log in self.logs().glob("monitor*"):
            shutil.copy(log, self.workdir / log.name)
        for log in self.logs().glob("worker-*.err"):
            if b":actor_name:TrainController" in log.read_bytes()[:200]:
                shutil.copy(log, self.workdir / f"controller-{log.stem.rsplit('-', 1)[-1]}.err")
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "FakeCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def kill_node(raylet_socket_name: str) -> list[int]:
    """SIGKILL the raylet listening on ``raylet_socket_name`` (``ray.nodes()[i]["RayletSocketName"]``,
    unique per node: it lies in the cluster's temp dir) with its workers and agents, all at once:
    the node vanishes as a reclaimed spot VM does, with no drain and no goodbye to the GCS."""
    raylets = [p for p in pids_running(f"--raylet_socket_name={raylet_socket_name}")
               if "raylet" in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")]
    assert len(raylets) == 1, f"expected one raylet for {raylet_socket_name}, found {raylets}"
    tree = process_tree(raylets[0])
    for pid in tree:
        _sigkill(pid)
    return tree
