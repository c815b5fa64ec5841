"""A training driver on a running Ray cluster, with a watcher that plays a spot node's ends on it.

``python -m tests.helpers.cluster_train ADDRESS SPEC.json`` connects with ``ray.init(address)``
(its own process: the test's pytest process may hold a local Ray), runs ``run_training`` and,
from a thread, watches the cluster: every worker node seen alive and, in turn,

* the *reclaim*: once step ``drain_after`` is logged, a spot reclaim notice to a node that hosts
  training workers (the GCS request of ``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION``
  with a ``drain_s`` deadline), and its SIGKILL at the deadline, as the cloud takes the VM (Ray
  Core calls a drained node that dies after its deadline pre-empted, one that dies before it failed).
  Ray Train restarts its group at the deadline as well, and a drained raylet left idle shuts itself
  down: whichever comes first, the node's end is recorded at the time it was seen gone;
* the *loss*: once Ray Train has registered the checkpoint of step ``kill_after``, the SIGKILL
  of a training node with no notice at all (:func:`tests.helpers.fake_cluster.kill_node`).

It prints one ``RESULT {json}`` line. :class:`ClusterRun` is the test side.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.helpers.fake_cluster import REPO, kill_node

# What every process of the cluster needs (to import the test models; one torch thread, as the
# tests' local Ray): the head's environment, inherited by the autoscaler's fake nodes and their
# workers, as a real node has the package installed; no runtime_env, so Ray may reuse workers.
WORKER_ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
              "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# Ray Train's controller (it reads the driver's environment). A group start waits this long for
# its placement group (default 60 s); after an abrupt node loss the first restart asks for the
# old size (the autoscaling coordinator's view of the cluster is refreshed every 20 s), and only
# the retry after this timeout fits the nodes that are left. Its pre-emption watcher polls Ray
# Core's drain state every 0.5 s instead of 5 s. (tests/conftest.py sets its worker poll.)
DRIVER_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10", "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5"}


class ClusterRun:
    """The driver against ``cluster`` (a FakeCluster, maybe still starting) with sample keys
    logged, in the background: :meth:`result` waits for its RESULT dict. The cluster is stopped
    as soon as the driver ends. ``log``: where to keep the driver's output."""

    def __init__(self, cluster, train, model_class: str, drain_after: int, drain_s: float, kill_after: int,
                 timeout: float, log: Path | None = None):
        self.cluster, self.train, self.timeout, self.log = cluster, train, timeout, log
        spec = Path(cluster.temp_dir) / "train_spec.json"
        spec.write_text(json.dumps({"train": dataclasses.asdict(train), "model_class": model_class,
                                    "drain_after": drain_after, "drain_s": drain_s, "kill_after": kill_after}))
        self.go = spec.with_suffix(".go")
        env = {**cluster.env, **DRIVER_ENV, "BLIP2_LOG_KEYS": "1"}
        env.pop("BLIP2_FAULT_INJECT", None)
        # the driver's imports (torch, Ray Train) overlap the head's start; it connects on `go`
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.cluster_train", cluster.address,
                                      str(spec)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.stdout = self.stderr = ""
        self.error: BaseException | None = None
        self._waiter = threading.Thread(target=self._wait, name="cluster-run", daemon=True)
        self._waiter.start()

    def _wait(self) -> None:
        try:
            self.cluster.wait_ready()
            self.go.touch()
            self.stdout, self.stderr = self.proc.communicate(timeout=self.timeout)
        except BaseException as e:  # noqa: BLE001 - raised again by result()
            self.error = e
            if self.proc.poll() is None:
                self.proc.kill()
            out, err = self.proc.communicate()
            self.stdout, self.stderr = self.stdout + out, self.stderr + err
        finally:
            if self.log is not None:
                Path(self.log).write_text(self.stdout + self.stderr)
            self.cluster.stop()

    def stop(self) -> None:
        """Kill the driver if it still runs, and wait until the cluster is down."""
        if self.proc.poll() is None:
            self.proc.kill()
        self._waiter.join(120)

    def result(self) -> dict:
        self._waiter.join()
        line = [x for x in self.stdout.splitlines() if x.startswith("RESULT ")]
        if self.error is not None or not line:
            raise AssertionError(f"driver rc {self.proc.returncode}: {self.error!r}\n{self.diagnostics()}")
        return json.loads(line[-1][len("RESULT "):])

    def diagnostics(self) -> str:
        """What a failed run leaves to read: the watcher's lines, the driver's last words, and the
        autoscaler's and Ray Train controller's logs (copied by FakeCluster.stop)."""
        watcher = [x for x in self.stderr.splitlines() if x.startswith("[watcher]")]
        tail = [x for x in (self.stdout + self.stderr).splitlines() if x.strip() and "[state-dump]" not in x][-30:]
        parts = ["watcher:", *watcher, "driver output (end):", *tail]
        workdir = self.cluster.workdir
        for log in sorted(workdir.glob("controller-*.err")):
            parts += [f"{log.name} (end):", *log.read_text(errors="replace").splitlines()[-25:]]
        monitor = workdir / "monitor.log"
        if monitor.exists():
            parts += ["autoscaler events:", *[x for x in monitor.read_text(errors="replace").splitlines()
                                              if "event_summary" in x or "Queue" in x][-25:]]
        return "\n".join(parts)


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.2)


class NodeWatcher(threading.Thread):
    """Records worker nodes as they come and go; drains a training node once step ``drain_after``
    is logged and kills it at the drain's deadline (the reclaim), then kills a training node once
    checkpoint ``kill_after`` is registered, so the restart has it to resume from (the loss)."""

    def __init__(self, address: str, run_uri: str, drain_after: int, drain_s: float, kill_after: int,
                 period: float = 0.25):
        super().__init__(name="node-watcher", daemon=True)
        import ray

        self.address, self.run_uri, self.period = address, run_uri, period
        self.drain_after, self.drain_s, self.kill_after = drain_after, drain_s, kill_after
        self.head = ray.get_runtime_context().get_node_id()
        self.seen: dict[str, float] = {}        # worker node id -> first time seen alive
        self.lost: dict[str, float] = {}        # worker node id -> first time seen dead
        self.drain: dict = {}
        self.reclaim: dict = {}
        self.loss: dict = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.period):
            try:
                self._poll()
            except Exception as e:  # noqa: BLE001 - a GCS hiccup must not stop the watch
                print(f"[watcher] {e!r}", file=sys.stderr, flush=True)

    def _poll(self) -> None:
        import ray

        now = time.time()
        nodes = {n["NodeID"]: n for n in ray.nodes() if n["NodeID"] != self.head}
        for nid, n in nodes.items():
            if n["Alive"]:
                self.seen.setdefault(nid, now)
            elif nid in self.seen:
                self.lost.setdefault(nid, now)
        alive = {nid: n for nid, n in nodes.items() if n["Alive"]}
        if not self.drain:
            if _last_step(self.run_uri) >= self.drain_after:
                self.drain = self._drain(alive)
        elif not self.reclaim:
            node = self.drain["node"]
            if now >= self.drain["deadline"] and node in alive:
                self.reclaim = self._kill(alive, node)
            elif node in self.lost:
                # Ray Train restarts the group at the deadline too; a drained raylet left with no
                # work shuts itself down, and may do so before this poll comes round
                self.reclaim = self._record_loss(node, self.lost[node], pids=0, training_nodes=_training_nodes(alive))
        elif not self.loss and _registered_step(self.run_uri) >= self.kill_after:
            hosts = _training_nodes(alive)
            if hosts:  # else the worker group is being (re)placed: try at the next poll
                self.loss = self._kill(alive, hosts[0])

    def _drain(self, alive: dict) -> dict:
        hosts = _training_nodes(alive)
        if not hosts:
            return {}
        node, t = hosts[0], time.time()
        # what `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds`
        # sends, without the CLI's seconds of start-up
        import ray
        from ray.core.generated import autoscaler_pb2

        accepted, why = ray._raylet.GcsClient(address=self.address).drain_node(
            node, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), "spot reclaim (test)",
            int((t + self.drain_s) * 1000))
        assert accepted, why
        step = _last_step(self.run_uri)
        print(f"[watcher] drained node {node[:12]} after step {step}", file=sys.stderr, flush=True)
        return {"node": node, "time": t, "deadline": t + self.drain_s, "step": step}

    def _kill(self, alive: dict, node: str) -> dict:
        hosts = _training_nodes(alive)
        pids = kill_node(alive[node]["RayletSocketName"])
        return self._record_loss(node, time.time(), pids=len(pids), training_nodes=hosts)

    def _record_loss(self, node: str, t: float, pids: int, training_nodes: list[str]) -> dict:
        loss = {"node": node, "time": t, "pids": pids, "step": _last_step(self.run_uri, before=t),
                "checkpoint": _registered_step(self.run_uri), "training_nodes": training_nodes}
        print(f"[watcher] node {node[:12]} gone ({pids} processes killed) after step {loss['step']}",
              file=sys.stderr, flush=True)
        return loss


def _training_nodes(alive: dict) -> list[str]:
    """The ``alive`` nodes holding bundles of a placed placement group (Ray Train's worker group)."""
    from ray.util import placement_group_table

    return sorted({nid for pg in placement_group_table().values() if pg["state"] == "CREATED"
                   for nid in pg["bundles_to_node_id"].values() if nid in alive})


def _registered_step(run_uri: str) -> int:
    """The newest checkpoint Ray Train has registered: its snapshot in storage, read on restart."""
    path = Path(run_uri) / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(path.read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return 0  # none yet, or being rewritten
    return max([r["metrics"]["step"] for r in results], default=0)


def _last_step(run_uri: str, before: float = float("inf")) -> int:
    path = Path(run_uri) / "metrics.jsonl"
    steps = [0]
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a row being written
            if row["time"] <= before:
                steps.append(row["step"])
    return max(steps)


def main(address: str, spec_path: str) -> None:
    import ray
    import ray.train.torch  # noqa: F401 - imported while the head starts

    from orchestration.config import build
    from training.config import ModelConfig, TrainConfig
    from training.loop import run_training, run_uri

    spec = json.loads(Path(spec_path).read_text())
    train = build(TrainConfig, spec["train"])
    _wait_for(Path(spec_path).with_suffix(".go"), 180)
    ray.init(address=address, log_to_driver=False)
    watcher = NodeWatcher(address, run_uri(train), spec["drain_after"], spec["drain_s"], spec["kill_after"])
    watcher.start()
    t0, error = time.time(), None
    try:
        result = run_training(ModelConfig(), train, model_class_spec=spec["model_class"])
        error = None if result.error is None else repr(result.error)
    except Exception as e:  # noqa: BLE001 - reported to the test
        error = repr(e)
    watcher.done.set()
    watcher.join(10)
    print("RESULT " + json.dumps({"error": error, "wall_s": time.time() - t0, "t0": t0, "seen": watcher.seen,
                                  "lost": watcher.lost, "drain": watcher.drain, "reclaim": watcher.reclaim,
                                  "loss": watcher.loss}),
          flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
