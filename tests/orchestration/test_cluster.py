"""`ray_cluster.yaml`: valid for Ray's launcher, and its node types autoscale for real on Ray's
fake multi-node provider (head + cpu_worker + gpu_worker with logical GPUs, one machine)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import pytest

from tests.helpers.fake_cluster import FakeCluster, fake_twin, load_cluster


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


@pytest.mark.slow
def test_gpu_job_scales_gpu_worker_up_and_idle_node_goes_away(tmp_path):
    with FakeCluster(partial(fake_twin, load_cluster()), tmp_path, head_cpus=1) as cluster:
        cluster.wait_ready()
        driver = subprocess.run([sys.executable, "-c", DRIVER, cluster.address], env=cluster.env,
                                capture_output=True, text=True, timeout=330)
        line = [x for x in driver.stdout.splitlines() if x.startswith("RESULT ")]
        assert line, driver.stdout[-2000:] + driver.stderr[-3000:]
        out = json.loads(line[0][len("RESULT "):])
    assert out["gpu_nodes_before"] == [] and out["cluster_gpus_before"] == 0   # head has no GPU
    assert out["task"]["gpu_ids"] and out["cluster_gpus_during"] == 8          # a gpu_worker came up
    assert len(out["gpu_nodes_during"]) == 1
    assert out["gpu_nodes_after"] == []                                        # and went away when idle
