"""The local Ray every command starts: its workers' State API is its own, whatever else runs here."""
from __future__ import annotations

from pathlib import Path

DEFAULT_CLUSTER_FILE = Path("/tmp/ray/ray_current_cluster")  # `ray start` writes it; `ray stop` and a `ray start --block` that ends remove it


def test_state_api_in_local_workers_answers_for_this_cluster_beside_a_ray_start_head(ray_head, ray_local):
    # `ray start --head` makes itself the machine's default cluster. Ray Train's placement-group
    # cleaner, in a worker of the local cluster, asks the State API whether the run's controller
    # lives: it must reach this cluster, not the other one (which knows no such actor and so reads
    # as dead, or hangs when that cluster is gone). Another cluster of the suite may have removed
    # or replaced the file since the head started, so the test names the head there again itself.
    ray = ray_local
    assert ray_head.port != int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])
    before = DEFAULT_CLUSTER_FILE.read_text() if DEFAULT_CLUSTER_FILE.exists() else None
    DEFAULT_CLUSTER_FILE.parent.mkdir(parents=True, exist_ok=True)
    DEFAULT_CLUSTER_FILE.write_text(ray_head.address)
    try:
        @ray.remote(num_cpus=0)
        class Probe:
            def own_state(self):
                from ray.util.state import get_actor

                return get_actor(ray.get_runtime_context().get_actor_id(), timeout=10)

        probe = Probe.remote()
        state = ray.get(probe.own_state.remote(), timeout=60)
        assert state is not None and state.state == "ALIVE" and state.class_name.endswith("Probe")
        ray.kill(probe)
    finally:
        if before is None:
            DEFAULT_CLUSTER_FILE.unlink(missing_ok=True)
        else:
            DEFAULT_CLUSTER_FILE.write_text(before)
