"""Starting or joining Ray happens here, at the edge, once per command."""
from __future__ import annotations

import os
import socket

from orchestration.config import RayConfig

# Every Ray worker imports img2dataset/albumentations lazily; keep them offline and quiet.
WORKER_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}


def ensure_ray(cfg: RayConfig):
    """Join the cluster named by ``cfg.address`` / ``RAY_ADDRESS`` or start a local one."""
    import ray

    if ray.is_initialized():
        return ray
    if cfg.address or os.environ.get("RAY_ADDRESS"):
        # Joining a cluster (typically as a `ray job submit` entrypoint): the job's runtime_env,
        # set by `blip2 submit`, already carries WORKER_ENV; passing another one would conflict.
        ray.init(address=cfg.address or os.environ["RAY_ADDRESS"], log_to_driver=cfg.log_to_driver)
    else:
        # address="local": never join a stray cluster by accident; 127.0.0.1 keeps Ray's own
        # traffic on loopback on a laptop or CI box. Ray Train's placement-group cleaner asks the
        # State API (the dashboard) whether the run's controller lives; without a dashboard named
        # to the workers it falls back to the newest `ray start` cluster on the machine, stale or
        # another one, and stalls every run's end on its timeouts.
        port = free_port()
        env = {**WORKER_ENV, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, _node_ip_address="127.0.0.1", runtime_env={"env_vars": env},
                 log_to_driver=cfg.log_to_driver)
    return ray


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logs_dir() -> str:
    """Where this Ray session keeps the workers' logs (``<session>/logs``)."""
    import ray

    return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
