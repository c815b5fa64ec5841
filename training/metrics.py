"""Per-step training metrics: ``metrics.jsonl`` + ``metrics.csv`` in the run directory, loss-curve PNG.

The run directory may be on S3: the files are kept in a local staging folder and copied to the
run directory (fsspec) whenever a checkpoint is taken and at the end, so a resumed run
continues the same files. Rows after the step a run resumes from are dropped on resume.
Each row also goes to the experiment trackers enabled in the config (TensorBoard / MLflow /
W&B, :mod:`training.trackers`) when the loop passes them in.
"""
from __future__ import annotations

import csv
import io
import json

import fsspec

from pipelines.storage import Staging

FIELDS_FIRST = ("step", "epoch", "lr", "loss")


class MetricsLog:
    def __init__(self, run_uri: str, start_step: int = 0, trackers=None):
        self.trackers = trackers  # training.trackers.Trackers | None
        self.staging = Staging(run_uri, prefix="blip2-metrics-")
        self.dir = self.staging.path
        self.rows = [r for r in read_metrics(run_uri) if r["step"] <= start_step]
        self._rewrite()

    def log(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.trackers is not None:
            self.trackers.log(row)

    def flush(self) -> None:
        """Write ``metrics.csv`` and (remote run dirs) upload both files; flush the trackers."""
        if self.trackers is not None:
            self.trackers.flush()
        (self.dir / "metrics.csv").write_text(to_csv(self.rows))
        self.staging.upload("metrics.jsonl", "metrics.csv")

    def close(self) -> None:
        """The end of this invocation: end the trackers' runs, then write and upload the files."""
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None
        self.flush()

    def _rewrite(self) -> None:
        with open(self.dir / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.rows)
        self.flush()


def to_csv(rows: list[dict]) -> str:
    keys = list(FIELDS_FIRST)
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def read_metrics(run_uri: str) -> list[dict]:
    """The rows of ``<run>/metrics.jsonl`` (empty when there is none yet)."""
    fs, root = fsspec.core.url_to_fs(run_uri)
    path = f"{root}/metrics.jsonl"
    if not fs.exists(path):
        return []
    return [json.loads(line) for line in fs.cat(path).decode().splitlines() if line.strip()]


def plot_loss_curve(rows: list[dict], out_png: str) -> str:
    """Total and per-objective losses against step (matplotlib, Agg) → ``out_png`` (local or s3://)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    for key in sorted({k for r in rows for k in r if k == "loss" or k.startswith("loss_")}):
        ax.plot(steps, [r.get(key) for r in rows], label=key, lw=2 if key == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    with fsspec.open(out_png, "wb") as f:
        f.write(buf.getvalue())
    return out_png


def summary(rows: list[dict]) -> str:
    """A one-screen text summary of a run's metrics."""
    if not rows:
        return "no metrics logged"
    first, last = rows[0], rows[-1]
    losses = sorted(k for k in last if k.startswith("loss"))
    tail = rows[-min(10, len(rows)):]
    avg = lambda k: sum(r.get(k, 0.0) for r in tail) / len(tail)  # noqa: E731
    lines = [f"steps {first['step']}..{last['step']}  epoch {last.get('epoch')}  lr {last['lr']:.3g}"]
    lines += [f"  {k:<10} first {first.get(k, float('nan')):.4f}  last {last[k]:.4f}  last-10 avg {avg(k):.4f}"
              for k in losses]
    lines.append(f"  samples/s {avg('samples_per_s'):.1f}  tokens/s {avg('tokens_per_s'):.1f}  "
                 f"data wait {avg('data_wait_s') * 1000:.1f} ms/step  replaced samples "
                 f"{sum(r.get('replaced', 0) for r in rows)}")
    mix = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("samples/")}
    if mix:  # the realised per-source mix of the whole run (human rows count once per caption seen)
        total = sum(mix.values()) or 1
        lines.append("  samples per source: " + ", ".join(f"{s} {n} ({100 * n / total:.2f} %)"
                                                         for s, n in sorted(mix.items())))
    return "\n".join(lines)
