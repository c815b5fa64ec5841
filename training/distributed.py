"""All-gathers for the stage-1 losses: one code path for 1 process and for N processes.

A single-GPU user never needs ``torch.distributed``: with no process group initialised every
helper is the identity (world size 1, rank 0, offset 0). Under Ray Train (or any
``torch.distributed`` group) they gather along dim 0, in rank order.

Gradient semantics, as in LAVIS (``concat_all_gather`` / ``all_gather_with_grad``):

* ``all_gather_no_grad`` — ITC targets and ITM sampling weights. With N processes the gathered
  tensor is a copy without grad, so a rank's ITC loss back-propagates only through its *local*
  features (the rows of its similarity matrices), never through other ranks' features. With one
  process the input is returned as is, so the gradient also flows through the "gathered" side
  (this is what LAVIS does on a single GPU too).
* ``all_gather_with_grad`` — the image embeddings from which ITM hard negatives are drawn: the
  backward pass sums every rank's gradient into the owner's slice.

Ranks may hold different batch sizes (dim 0 is padded for the collective and stripped after);
every rank must call the helpers in the same order, as with any collective.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def gather_sizes(n: int, device: torch.device) -> list[int]:
    """Dim-0 size of every rank's tensor, in rank order (``[n]`` without a process group)."""
    if not is_distributed():
        return [n]
    local = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(local) for _ in range(world_size())]
    dist.all_gather(out, local)
    return [int(s.item()) for s in out]


def rank_offset(n: int, device: torch.device) -> int:
    """Global index of this rank's first row (ranks ordered, batches concatenated)."""
    return sum(gather_sizes(n, device)[: rank()])


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    pad = t.new_zeros((rows - t.shape[0], *t.shape[1:]))
    return torch.cat([t, pad], dim=0)


def all_gather_no_grad(t: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """``[n_r, ...]`` on each rank → ``[sum n_r, ...]``; no grad with N processes (see module doc).

    ``sizes`` (from :func:`gather_sizes`) saves the size exchange when already known."""
    if not is_distributed():
        return t
    sizes = sizes or gather_sizes(t.shape[0], t.device)
    padded = _pad_rows(t.detach().contiguous(), max(sizes))
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)], dim=0)


def all_gather_with_grad(t: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """``[n_r, ...]`` → ``[sum n_r, ...]``; gradients of every rank flow back to the owner's rows."""
    if not is_distributed():
        return t
    from torch.distributed.nn.functional import all_gather

    sizes = sizes or gather_sizes(t.shape[0], t.device)
    out = all_gather(_pad_rows(t.contiguous(), max(sizes)))
    return torch.cat([o[:s] for o, s in zip(out, sizes)], dim=0)


def global_max(n: int, device: torch.device) -> int:
    """Largest ``n`` over all ranks (e.g. the longest tokenised text, so ids can be gathered)."""
    if not is_distributed():
        return n
    t = torch.tensor([n], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
