"""`ray_cluster.yaml`: valid for Ray's launcher, and its node types autoscale for real on Ray's
fake multi-node provider (head + cpu_worker + gpu_worker with logical GPUs, one machine)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers.servers import free_port

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "ray_cluster.yaml"


def load_cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_validates_against_rays_schema():
    import jsonschema
    import ray
    from ray.autoscaler._private.util import validate_config

    cfg = load_cluster()
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    validate_config(cfg)  # Ray's own launcher check (schema + node-type consistency), no cloud call
    types = cfg["available_node_types"]
    assert cfg["provider"]["type"] == "aws" and cfg["head_node_type"] in types
    assert {"cpu_worker", "gpu_worker"} <= set(types)
    gpu = types["gpu_worker"]["node_config"]["InstanceType"]
    assert gpu.startswith(("p4d.", "p5.")), "GPU workers are 8×A100/H100 instances"
    for name in ("cpu_worker", "gpu_worker"):
        assert types[name]["min_workers"] == 0 < types[name]["max_workers"] <= cfg["max_workers"]
    assert any("pip install -e ." in c for c in cfg["setup_commands"])
    assert "~/blip2-pipeline" in cfg["file_mounts"]


def fake_twin(cfg: dict, gcs_address: str, gpus_per_node: int = 8) -> dict:
    """The same node types on Ray's fake provider: resources spelled out (logical GPUs), tiny sizes."""
    resources = {"cpu_worker": {"CPU": 1}, "gpu_worker": {"CPU": 1, "GPU": gpus_per_node}}
    types = {name: {"resources": resources[name], "node_config": {}, "min_workers": 0, "max_workers": 1,
                    **({"idle_timeout_s": 5} if "idle_timeout_s" in t else {})}
             for name, t in cfg["available_node_types"].items() if name in resources}
    types["ray.head.default"] = {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0}
    return {"cluster_name": cfg["cluster_name"] + "-fake", "max_workers": 2, "upscaling_speed": 1.0,
            "idle_timeout_minutes": 0.1,
            "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "disable_launch_config_check": True,
                         "disable_node_updaters": True, "use_node_id_as_ip": True},
            "auth": {"ssh_user": "ubuntu"}, "available_node_types": types, "head_node_type": "ray.head.default",
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": []}


DRIVER = textwrap.dedent("""
    import json, sys, time, ray
    ray.init(address=sys.argv[1], log_to_driver=False)
    def gpu_nodes():
        return [n["NodeManagerAddress"] + "/" + n["NodeID"][:8] for n in ray.nodes()
                if n["Alive"] and n["Resources"].get("GPU", 0) > 0]
    out = {"gpu_nodes_before": gpu_nodes(), "cluster_gpus_before": ray.cluster_resources().get("GPU", 0)}

    @ray.remote(num_gpus=1)
    def train_step():  # stands in for a Ray Train worker asking for a GPU
        ctx = ray.get_runtime_context()
        return {"node": ctx.get_node_id(), "gpu_ids": ray.get_gpu_ids()}

    t0 = time.time()
    out["task"] = ray.get(train_step.remote(), timeout=150)
    out["scale_up_s"] = time.time() - t0
    out["gpu_nodes_during"] = gpu_nodes()
    out["cluster_gpus_during"] = ray.cluster_resources().get("GPU", 0)
    t1 = time.time()
    while gpu_nodes() and time.time() - t1 < 150:
        time.sleep(1)
    out["gpu_nodes_after"] = gpu_nodes()
    out["scale_down_s"] = time.time() - t1
    print("RESULT " + json.dumps(out))
""")


def stop_group(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM the head's process group (ray start + GCS + monitor + fake nodes), SIGKILL after ``grace``."""
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


@pytest.mark.slow
def test_gpu_job_scales_gpu_worker_up_and_idle_node_goes_away(tmp_path):
    port = free_port()
    config = tmp_path / "fake_cluster.yaml"
    config.write_text(yaml.safe_dump(fake_twin(load_cluster(), f"127.0.0.1:{port}")))
    ray_bin = str(Path(sys.executable).with_name("ray"))
    # Own (short: unix socket paths) temp dir, so this cluster never becomes the machine's
    # default `ray.init()` address.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayfake-", dir="/tmp"))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
                             "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                             f"--temp-dir={temp_dir}", f"--autoscaling-config={config}",
                             "--disable-usage-stats"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90
        while not list(temp_dir.glob("session_*/logs/monitor*")):
            assert head.poll() is None and time.time() < deadline, "fake-provider head did not start"
            time.sleep(1)
        driver = subprocess.run([sys.executable, "-c", DRIVER, f"127.0.0.1:{port}"], env=env, capture_output=True,
                                text=True, timeout=330)
        line = [x for x in driver.stdout.splitlines() if x.startswith("RESULT ")]
        assert line, driver.stdout[-2000:] + driver.stderr[-3000:]
        out = json.loads(line[0][len("RESULT "):])
    finally:
        stop_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert out["gpu_nodes_before"] == [] and out["cluster_gpus_before"] == 0   # head has no GPU
    assert out["task"]["gpu_ids"] and out["cluster_gpus_during"] == 8          # a gpu_worker came up
    assert len(out["gpu_nodes_during"]) == 1
    assert out["gpu_nodes_after"] == []                                        # and went away when idle
