"""Test-only hooks of the training loop. They are read from the environment by the driver
(``run_training``) and shipped to the workers, so they never appear as user config keys
(``blip2 config`` stays free of them).

* ``BLIP2_FAULT_INJECT="step=5,marker=/tmp/x[,rank=0]"``: at that optimizer step, the given
  rank (default: the last) SIGKILLs itself, like a lost node, unless the local marker file
  exists; it writes the marker first, so the restarted worker group runs on.
* ``BLIP2_LOG_KEYS=1``: every metrics row carries the step's sample keys (all ranks), so
  tests can check that an epoch saw each sample exactly once.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Hooks:
    kill_at_step: int = 0
    kill_rank: int = -1            # -1: the last rank
    marker: str = ""
    log_keys: bool = False

    @classmethod
    def from_env(cls, env=None) -> "Hooks":
        env = os.environ if env is None else env
        fault = dict(kv.split("=", 1) for kv in env.get("BLIP2_FAULT_INJECT", "").split(",") if "=" in kv)
        unknown = set(fault) - {"step", "marker", "rank"}
        if unknown or (fault and not fault.get("marker")):
            raise ValueError(f"BLIP2_FAULT_INJECT: expected step=N,marker=PATH[,rank=R], got {fault}")
        return cls(kill_at_step=int(fault.get("step", 0)), kill_rank=int(fault.get("rank", -1)),
                   marker=fault.get("marker", ""), log_keys=env.get("BLIP2_LOG_KEYS", "") not in ("", "0"))

    def maybe_kill(self, step: int, rank: int, world: int) -> None:
        if not self.kill_at_step or step != self.kill_at_step:
            return
        if rank != (self.kill_rank if self.kill_rank >= 0 else world - 1):
            return
        marker = Path(self.marker)
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"killed rank {rank} of {world} pid {os.getpid()} at step {step}\n")
            os.kill(os.getpid(), signal.SIGKILL)
