"""The two renderings of one shard-set inspection: the one-screen text summary and a
self-contained HTML page.

Everything in the page is inlined (histograms rendered with matplotlib's Agg backend as base64 PNGs,
thumbnails as base64 JPEGs), so the file can be mailed, opened offline or attached to CI.
All text from the data (captions, keys, sources) is HTML-escaped: web captions are hostile.
"""
from __future__ import annotations

import base64
import html
import io
from collections import Counter
from pathlib import Path

from pipelines.curation import REMOVED_DIR
from pipelines.inspect import Distribution, Inspection, Thumbnail

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1180px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:22px 0 8px} h3{font-size:14px;margin:14px 0 6px}
table.stats td{padding:2px 12px 2px 0;vertical-align:top;font-size:13px}
.problems li{color:#b00020}.ok{color:#167a2e}
.charts{display:flex;flex-wrap:wrap;gap:8px}.charts img{width:370px;border:1px solid #ddd}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:10px}
figure.thumb{margin:0;padding:6px;border:1px solid #ddd;border-radius:4px;font-size:12px}
figure.thumb img{display:block;max-width:160px;max-height:160px;margin:0 auto 4px}
.key{color:#777;font-family:monospace}.note{color:#8a4b00;font-size:11px}.score{color:#1f4e99;font-family:monospace}
pre{background:#f6f6f6;padding:8px;font-size:12px;overflow-x:auto}
"""


# -- the one-screen text summary ----------------------------------------------------------
def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _fmt_dist(d: Distribution, digits: int = 0) -> str:
    s = d.summary()
    if not s["n"]:
        return "-"
    f = f"{{:.{digits}f}}"
    return (f"n={s['n']}  min {f.format(s['min'])}  p05 {f.format(s['p05'])}  p50 {f.format(s['p50'])}  "
            f"p95 {f.format(s['p95'])}  max {f.format(s['max'])}  mean {s['mean']:.{max(digits, 1)}f}")


def _fmt_counter(c: Counter, limit: int = 12) -> str:
    items = c.most_common()
    text = ", ".join(f"{k}: {v}" for k, v in items[:limit])
    return text + (f", … ({len(items) - limit} more)" if len(items) > limit else "") if items else "-"


def format_text(ins: Inspection) -> str:
    """The printed report: one screen of statistics, then problems and sample rows."""
    lines = [
        f"shard set        {ins.uri}",
        f"contract         {ins.contract or 'unknown'}   schema versions: {_fmt_counter(ins.schema_versions)}",
        f"shards           {ins.shards}   rows {ins.rows}   bytes {ins.bytes} ({_human_bytes(ins.bytes)})",
        f"manifest         {'present' if ins.manifest is not None else 'none (another tool wrote this folder)' if 'read from' in (ins.contract or '') else 'MISSING'}"
        + (f" ({ins.manifest.get('num_shards')} shards, {ins.manifest.get('num_rows')} rows, "
           f"created {ins.manifest.get('created_at')})" if ins.manifest else ""),
        f"sources          {_fmt_counter(ins.sources)}",
    ]
    if ins.policies:
        lines.append(f"caption policy   {_fmt_counter(ins.policies)}")
    if ins.status:
        lines.append(f"status           {_fmt_counter(ins.status)}")
    lines += [
        f"image width      {_fmt_dist(ins.width)}",
        f"image height     {_fmt_dist(ins.height)}",
    ]
    if ins.original_width.n:
        lines += [f"original width   {_fmt_dist(ins.original_width)}",
                  f"original height  {_fmt_dist(ins.original_height)}"]
    lines.append(f"caption words    {_fmt_dist(ins.caption_words)}")
    if ins.captions_per_image.n:
        lines.append(f"captions/image   {_fmt_dist(ins.captions_per_image)}")
    if ins.clip_scores.n:
        lines.append(f"CLIP score kept  {_fmt_dist(ins.clip_scores, 3)}")
    for k, d in ins.meta_scores.items():
        if d.n:
            lines.append(f"list {k:<11} {_fmt_dist(d, 2)}")
    for k, c in ins.meta_tags.items():
        if c:
            lines.append(f"list {k:<11} {_fmt_counter(c)}")
    if ins.share_original_kept is not None:
        lines.append(f"original kept    {ins.original_kept}/{ins.rows} rows "
                     f"({100 * ins.share_original_kept:.1f}%) keep the web caption among the two")
    if ins.image_errors:
        lines.append(f"image errors     {ins.image_errors} images whose header PIL cannot read")
    if ins.curation is not None:
        c = ins.curation
        lines.append(f"curation         {c.rows_in} rows in = {c.kept} kept + {c.removed} removed "
                     f"({_fmt_counter(c.by_reason)}); side table {REMOVED_DIR}/")
    lines.append(f"duplicate keys   {ins.duplicate_keys}"
                 + (f"  e.g. {', '.join(f'{k} in {v}' for k, v in list(ins.duplicate_examples.items())[:3])}"
                    if ins.duplicate_keys else ""))
    check = "verified: sha256 + schema + full decode of every shard" if ins.verified else \
        "listing vs manifest (names, sizes, rows); --verify also checks sha256"
    lines.append(f"consistency      {'OK' if ins.ok else f'{len(ins.problems)} PROBLEM(S)'} ({check})")
    lines += [f"  ! {p}" for p in ins.problems]
    if ins.samples:
        lines.append(f"sample rows ({len(ins.samples)}):")
        for row in ins.samples:
            lines.append("  " + "  ".join(f"{k}={v!r}" for k, v in row.items()))
    return "\n".join(lines)


# -- the HTML page ------------------------------------------------------------------------
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _charts(ins: Inspection) -> list[tuple[str, str]]:
    """(title, data URI) of each histogram / bar chart that has data."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = []

    def hist(title: str, dist: Distribution, xlabel: str, color: str):
        if not dist.n:
            return
        vals, cnts = dist.values_and_counts()
        fig, ax = plt.subplots(figsize=(4.6, 2.8))
        if dist.resolution >= 1 and len(vals) <= 40:  # few integer values: one bar each
            ax.bar(vals, cnts, width=0.8 * dist.resolution, color=color)
            if len(vals) <= 12:
                ax.set_xticks(vals, [f"{v:g}" for v in vals])
        else:
            ax.hist(vals, bins=min(40, len(vals)), weights=cnts, color=color)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel("count", fontsize=9)
        out.append((title, _png(fig)))
        plt.close(fig)

    def bars(title: str, counter: Counter, color: str):
        if not counter:
            return
        items = counter.most_common(12)
        fig, ax = plt.subplots(figsize=(4.6, 2.8))
        ax.barh([str(k)[:24] for k, _ in items][::-1], [v for _, v in items][::-1], color=color)
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
        out.append((title, _png(fig)))
        plt.close(fig)

    bars("rows per status", ins.status, "#6a8caf")
    bars("rows per source", ins.sources, "#8f6aaf")
    hist("image width", ins.width, "pixels", "#4c9a6a")
    hist("image height", ins.height, "pixels", "#4c9a6a")
    hist("caption length", ins.caption_words, "words", "#c27c2c")
    hist("CLIP score of kept captions", ins.clip_scores, "cosine", "#2c6fc2")
    for name, dist in ins.meta_scores.items():
        hist(f"list metadata: {name}", dist, name, "#7a7a2c")
    for name, counter in ins.meta_tags.items():
        bars(f"list metadata: {name}", counter, "#7a7a2c")
    if ins.curation is not None:
        c = ins.curation
        bars("rows removed per reason", c.by_reason, "#b5523b")
        for name, label in (("clip_score", "curation: CLIP score of every input row"),
                            ("aesthetic", "curation: aesthetic score"), ("nsfw", "curation: NSFW head score"),
                            ("punsafe", "curation: LAION punsafe"), ("pwatermark", "curation: LAION pwatermark")):
            hist(label, c.scores.get(name, Distribution()), "score", "#b5523b")
        hist("curation: cosine of removed duplicates to the row kept", c.similarity, "cosine", "#b5523b")
    return out


def _thumb_html(t) -> str:
    caps = "".join(
        f"<div class='caption'>{html.escape(c)}"
        + (f" <span class='score'>{s:.3f}</span>" if s is not None else "") + "</div>"
        for c, s in zip(t.captions, t.scores))
    uri = "data:image/jpeg;base64," + base64.b64encode(t.jpeg).decode()
    note = f"<div class='note'>{html.escape(t.note)}</div>" if t.note else ""
    return (f"<figure class='thumb'><img class='thumb' src='{uri}' alt='{html.escape(t.key)}'>"
            f"<figcaption><div class='key'>{html.escape(t.key)}</div>{note}{caps}</figcaption></figure>")


def render_html(ins: Inspection) -> str:
    d = ins.to_dict()
    rows = [("contract", ins.contract or "unknown"), ("shards", ins.shards), ("rows", ins.rows),
            ("bytes", ins.bytes), ("manifest", "present" if ins.manifest is not None else "missing"),
            ("duplicate keys", ins.duplicate_keys)]
    if d["share_original_kept"] is not None:
        rows.append(("original caption kept", f"{100 * d['share_original_kept']:.1f}%"))
    stats = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    if ins.problems:
        consistency = "<ul class='problems'>" + "".join(
            f"<li>{html.escape(p)}</li>" for p in ins.problems) + "</ul>"
    else:
        consistency = f"<p class='ok'>consistent{' (verified)' if ins.verified else ''}</p>"
    charts = "".join(f"<img class='chart' src='{uri}' alt='{html.escape(title)}' title='{html.escape(title)}'>"
                     for title, uri in _charts(ins))
    thumbs = "".join(_thumb_html(t) for t in ins.thumbnails)
    curation = _curation_html(ins.curation) if ins.curation is not None else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>shard report: {html.escape(ins.uri)}</title>
<style>{_CSS}</style></head><body>
<h1>Shard report</h1><div class="key">{html.escape(ins.uri)}</div>
<h2>Summary</h2><table class="stats">{stats}</table>
<h2>Consistency</h2>{consistency}
<h2>Distributions</h2><div class="charts">{charts}</div>
{curation}<h2>Sample images ({len(ins.thumbnails)})</h2><div class="grid">{thumbs}</div>
<h2>Text summary</h2><pre>{html.escape(format_text(ins))}</pre>
</body></html>
"""


def _curation_html(c) -> str:
    """Counts per reason, the thresholds used and a grid of removed examples per reason."""
    rows = [("rows in", c.rows_in), ("kept", c.kept), ("removed (side table _removed/)", c.removed),
            *((f"removed: {r.replace('_', ' ')}", n) for r, n in c.by_reason.items()),
            *((f"threshold: {k.replace('_', ' ')}", f"{v:.4f}" if isinstance(v, float) else v)
              for k, v in c.thresholds.items() if v is not None)]
    table = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    grids = "".join(f"<h3>removed: {html.escape(reason.replace('_', ' '))} ({c.by_reason.get(reason, 0)})</h3>"
                    f"<div class='grid removed'>{''.join(_thumb_html(t) for t in thumbs)}</div>"
                    for reason, thumbs in c.examples.items())
    return f"<h2>Curation</h2><table class='stats curation'>{table}</table>{grids}"


def render_search_html(set_uri: str, query: str, hits: list[Thumbnail], info: dict) -> str:
    """A page of search hits: the query, what was searched, one thumbnail per hit (best first)."""
    about = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in info.items())
    thumbs = "".join(_thumb_html(t) for t in hits)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>search: {html.escape(query)}</title>
<style>{_CSS}</style></head><body>
<h1>Search</h1><div class="key">{html.escape(set_uri)}</div>
<h2>Query: {html.escape(query)}</h2><table class="stats">{about}</table>
<h2>Top {len(hits)}</h2><div class="grid">{thumbs}</div>
</body></html>
"""


def write_html(ins: Inspection, out: str | Path) -> Path:
    """Write the report to a local file; returns its path."""
    return write_page(render_html(ins), out)


def write_page(page: str, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
