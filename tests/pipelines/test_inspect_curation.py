"""The shard report of a curated set: removals per reason, score histograms, removed examples per reason."""
from __future__ import annotations

import re

import pytest

from capfilt.curate import run_curate
from capfilt.curate_config import CurateConfig
from orchestration.cli import main
from pipelines.inspect import inspect_shards
from pipelines.report import format_text
from tests.helpers.browser import ARTIFACTS, CHROMIUM, chromium
from tests.helpers.curation import write_curation_input


@pytest.fixture(scope="module")
def curated(ray_local, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("curated-report")
    data = write_curation_input(str(root / "in"), corpus, laion_columns=True)
    cfg = CurateConfig(input=data.uri, output=str(root / "out"))
    return data, cfg, run_curate(cfg, seed=0, log=lambda m: None)


def test_inspection_reads_the_side_table(curated):
    data, cfg, summary = curated
    ins = inspect_shards(cfg.output, thumbnails=16)
    assert ins.ok, ins.problems
    c = ins.curation
    s = summary["set"]
    assert (c.rows_in, c.kept, c.removed) == (s["rows_in"], s["kept"], s["removed"]) == (47, ins.rows, s["removed"])
    assert dict(c.by_reason) == {r: n for r, n in s["by_reason"].items() if n}
    assert c.scores["clip_score"].n == 47 and c.scores["pwatermark"].n == 47 and c.scores["nsfw"].n == 0
    assert c.similarity.n == s["by_reason"]["exact_duplicate"] + s["by_reason"]["near_duplicate"]
    for reason, thumbs in c.examples.items():
        assert 1 <= len(thumbs) <= 4 and all(reason in t.note for t in thumbs)
    assert f"curation         47 rows in = {c.kept} kept + {c.removed} removed" in format_text(ins)
    assert inspect_shards(data.uri).curation is None           # an uncurated set has no curation section


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); "
                                             ".ci/run installs it before the suite")
def test_curated_report_renders_in_headless_chromium(curated, tmp_path, capsys):
    _, cfg, summary = curated
    assert main(["shards", "inspect", cfg.output, "--html", str(tmp_path / "report.html"), "--thumbnails", "16"]) == 0
    assert "curation         47 rows in" in capsys.readouterr().out
    dom = chromium(["--dump-dom", (tmp_path / "report.html").as_uri()], tmp_path / "profile-dom")
    charts = re.findall(r'<img class="chart" src="data:image/png;base64,[A-Za-z0-9+/=]+" alt="([^"]+)"', dom)
    assert "rows removed per reason" in charts and "curation: CLIP score of every input row" in charts
    assert "curation: LAION pwatermark" in charts and "curation: cosine of removed duplicates to the row kept" in charts
    by_reason = {r: n for r, n in summary["set"]["by_reason"].items() if n}
    for reason, n in by_reason.items():
        assert f"<h3>removed: {reason.replace('_', ' ')} ({n})</h3>" in dom
    grids = re.findall(r'<div class="grid removed">(.*?)</div></figcaption></figure></div>', dom, re.S)
    assert len(grids) == len(by_reason)
    assert dom.count("removed: ") >= sum(min(n, 4) for n in by_reason.values())
    ARTIFACTS.mkdir(exist_ok=True)
    chromium([f"--screenshot={ARTIFACTS / 'curated_report.png'}", "--window-size=1200,2200", "--hide-scrollbars",
              (tmp_path / "report.html").as_uri()], tmp_path / "profile-shot")
    assert (ARTIFACTS / "curated_report.png").stat().st_size > 20_000
