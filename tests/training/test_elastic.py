"""Resized and elastic runs through ``run_training`` (toy model: Ray Train start-up, not the model,
is what these runs cost). A SIGKILLed worker under a fixed world size is
``tests/training/test_resume_stage1.py``'s.

* a run stopped at step 3 with 2 workers and resumed with 1 continues with the next unseen
  sample of the epoch's global order: over the epoch every sample is seen exactly once, and the
  global batch (8 = 4 × 2 × 1, then 4 × 1 × 2) and the LR schedule by optimizer step are kept;
* an elastic run (``num_workers=[1, 2]``) on an autoscaling cluster (Ray's fake multi-node
  provider, head with no CPUs as in ``ray_cluster.yaml``) lives through a spot node's two ends,
  one after the other.
  First a reclaim notice (``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`` with a
  deadline) to a node hosting its workers: the loop checkpoints at once, off the
  ``checkpoint_every`` schedule, and holds; the node goes at the deadline (killed, or shut down by
  its own raylet once Ray Train restarts the group off it), and the run resumes from that
  checkpoint with nothing redone. Later a node hosting its workers is SIGKILLed
  with no notice (raylet, workers and agents): the run resumes from the last registered
  checkpoint, on a node that is left or one the autoscaler brings up. With ``max_failures=1`` the
  run finishes only if Ray Train counted the first loss as a pre-emption, not a failure; the same
  exactly-once and fixed-global-batch checks hold. Its run starts with the session
  (tests/helpers/background.py): it mostly waits, and the tests before it use the time.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.background import handle
from tests.helpers.cluster_train import WORKER_ENV, ClusterRun
from tests.helpers.fake_cluster import FakeCluster, fake_twin, load_cluster
from tests.training.train_fixtures import TOY_EPOCH_STEPS, toy_train_config, write_capfilt
from training.metrics import read_metrics
from training.optim import lr_at

pytestmark = pytest.mark.slow
SLOW_TOY = "tests.training.toy_model:SlowToyModel"
STEPS = TOY_EPOCH_STEPS


def _assert_epoch_exactly_once(rows: list[dict]) -> None:
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    keys = [k for r in rows for k in r["keys"]]
    assert sorted(keys) == [f"{i:06d}" for i in range(48)]          # nothing repeated, nothing skipped
    assert all(len(r["keys"]) == 8 and r["global_batch"] == 8 for r in rows)
    assert [r["lr"] for r in rows] == pytest.approx([lr_at(s, 1e-3, 1e-4, 2, STEPS) for s in range(STEPS)])


def test_resume_with_fewer_workers_continues_with_the_next_unseen_sample(resized_toy_run):
    run, rows, _, _ = resized_toy_run   # 2 workers to step 3, then resumed on 1
    _assert_epoch_exactly_once(rows)
    assert [(r["world_size"], r["accum"]) for r in rows] == [(2, 1)] * 3 + [(1, 2)] * 3
    assert (run / "final" / "model.safetensors").exists()


# The GCS declares a node with a dead raylet lost after 4 failed health checks 1 s apart (Ray's
# default: 5 × 3 s): a dead raylet's port refuses at once. A live raylet starved on a loaded
# machine has Ray's default 10 s per answer, so only the killed nodes are ever declared dead.
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "10000",
                   "RAY_health_check_failure_threshold": "4"}


def _training_twin(gcs: str) -> dict:
    """Head without CPUs (like ray_cluster.yaml's); a pool of 2 to 4 cpu_worker nodes of 3 CPUs: one
    2-CPU training worker each, plus a CPU for the ingest tasks; idle nodes kept a minute, past the
    run. The pool's two nodes start with the cluster, as a warm spot pool's would (an elastic group
    waiting for nodes to launch keeps Ray Train's controller spinning, see the README); the
    autoscaler replaces a lost one. The fake provider keeps counting a SIGKILLed node, so 4 leaves
    room for a replacement after both losses, however the autoscaler placed the nodes."""
    return fake_twin(load_cluster(), gcs, resources={"cpu_worker": {"CPU": 3}}, min_workers=2, max_workers=4,
                     head_cpus=0, idle_timeout_minutes=1)


def _start_spot_run(workdir: Path) -> ClusterRun:
    """The spot test's run, on its own fake cluster: it starts with the session, because most of
    its ~2.5 min is waiting (the drain's deadline, health checks, restarts)."""
    from pipelines.synthetic import make_corpus

    write_capfilt(str(workdir / "capfilt"), (workdir / "corpus", make_corpus(workdir / "corpus", n=48, seed=0)),
                  rows_per_shard=12)
    # checkpoints are scheduled at step 4 and at the end only: one between is the notice's
    cfg = toy_train_config(workdir, "spot", num_workers=(1, 2), max_failures=1, cpus_per_worker=2, checkpoint_every=4)
    cluster = FakeCluster(_training_twin, workdir, head_cpus=0, env={**WORKER_ENV, **FAST_NODE_DEATH})
    return ClusterRun(cluster, cfg, model_class=SLOW_TOY, drain_after=1, drain_s=12, kill_after=4, timeout=420,
                      log=workdir / "driver.log")


@pytest.mark.background(start=_start_spot_run)
def test_spot_nodes_reclaimed_with_notice_then_lost_without_one_lose_no_sample(request):
    run = handle(request)
    out, cfg = run.result(), run.train
    run_dir = Path(cfg.output) / "spot"
    drain, reclaim, loss = out["drain"], out["reclaim"], out["loss"]
    assert drain and reclaim and reclaim["node"] == drain["node"], out    # drained, then reclaimed ...
    assert reclaim["time"] >= drain["deadline"], out                     # ... at its deadline, not before
    assert loss and loss["node"] in out["seen"] and loss["node"] in out["lost"], out  # ... later one lost
    assert out["error"] is None, out["error"]     # 2 losses, max_failures=1: the reclaim was a pre-emption
    rows = read_metrics(str(run_dir))
    _assert_epoch_exactly_once(rows)
    assert set(r["world_size"] for r in rows) <= {1, 2}

    notice = reclaim["checkpoint"]
    assert drain["step"] <= notice < STEPS and notice % cfg.checkpoint_every, out  # a checkpoint no schedule
    assert reclaim["step"] == notice, out    # asked for; the ranks held from it to the reclaim (nothing to redo)
    after_reclaim = [r for r in rows if r["time"] > reclaim["time"]]
    assert after_reclaim[0]["step"] == notice + 1, (reclaim, rows)        # ... and the run resumed from it

    after_loss = [r for r in rows if r["time"] > loss["time"]]
    assert after_loss and loss["step"] < STEPS, (loss, rows)             # the loss landed mid-epoch
    resumed_from = after_loss[0]["step"] - 1      # a registered checkpoint (a later one may be registered
    assert loss["checkpoint"] <= resumed_from <= loss["step"]            # just after the kill)
    assert loss["step"] - resumed_from <= cfg.checkpoint_every
    saved = rows[notice - 1]["time"]
    print(f"spot run: {len(out['seen'])} worker node(s) launched. Reclaim notice after step {drain['step']}: "
          f"checkpoint at step {notice} {saved - drain['time']:.1f} s after it, idle to the deadline "
          f"({reclaim['time'] - saved:.1f} s), 0 steps redone, first step "
          f"{after_reclaim[0]['time'] - reclaim['time']:.1f} s after the reclaim. Loss after step {loss['step']}: "
          f"resumed from checkpoint {resumed_from} ({loss['step'] - resumed_from} step(s) redone), GCS declared the "
          f"node dead {out['lost'][loss['node']] - loss['time']:.1f} s later, first step "
          f"{after_loss[0]['time'] - loss['time']:.1f} s after the loss; worlds {[r['world_size'] for r in rows]}; "
          f"driver {out['wall_s']:.1f} s")
    assert (run_dir / "final" / "model.safetensors").exists()
