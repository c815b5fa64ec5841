"""The HTML shard report, rendered for real in headless Chromium (screenshot kept in test-artifacts/)."""
from __future__ import annotations

import html
import re

import numpy as np
import pytest
from PIL import Image

from pipelines.inspect import inspect_shards
from pipelines.report import write_html
from tests.helpers.browser import ARTIFACTS, CHROMIUM, chromium
from tests.helpers.shards import write_capfilt_set


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); "
                                             ".ci/run installs it before the suite")
def test_html_report_renders_in_headless_chromium(corpus, tmp_path):
    write_capfilt_set(str(tmp_path / "cf"), corpus)
    ins = inspect_shards(str(tmp_path / "cf"), thumbnails=12)
    # one hostile caption: it must be shown as text, never interpreted as markup
    ins.thumbnails[1].captions[1] = "<b>bold</b> & <script>document.title='pwned'</script>"
    report = write_html(ins, tmp_path / "report.html")
    text = report.read_text()
    assert "<script>document" not in text and "http://" not in text.split("<pre>")[0].replace(
        "http://127.0.0.1", "")  # self-contained: no remote resources

    dom = chromium(["--dump-dom", report.as_uri()], tmp_path / "profile-dom")
    thumbs = re.findall(r'<img class="thumb" src="data:image/jpeg;base64,[A-Za-z0-9+/=]+"', dom)
    charts = re.findall(r'<img class="chart" src="data:image/png;base64,[A-Za-z0-9+/=]+"', dom)
    assert len(thumbs) == 12
    assert len(charts) == 5  # source, width, height, caption length, CLIP score
    for t in ins.thumbnails[:12]:
        assert html.escape(t.captions[0]) in dom
    assert "0.350" in dom and "0.320" in dom            # scores shown next to captions
    assert "&lt;script&gt;" in dom and "<title>shard report" in dom  # escaped, title untouched

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "shard_report.png"
    shot.unlink(missing_ok=True)
    chromium([f"--screenshot={shot}", "--window-size=1200,1600", "--hide-scrollbars", report.as_uri()],
             tmp_path / "profile-shot")
    assert shot.exists()
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (1600, 1200)
    # not blank: many distinct colours (charts, thumbnails) and real contrast
    assert pixels.std() > 20
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 200
