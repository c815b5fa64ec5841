"""`blip2 shards inspect` end to end: exit codes, --verify, --sample, --html, s3:// through moto."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from orchestration.cli import main
from pipelines.schema import CAPFILT
from pipelines.shardio import shard_name
from tests.helpers.shards import corrupt_middle, write_capfilt_set, write_download_set

REPO = Path(__file__).resolve().parents[2]


def test_inspect_prints_stats_and_samples(corpus, tmp_path, capsys):
    write_download_set(str(tmp_path / "dl"), corpus)
    assert main(["shards", "inspect", str(tmp_path / "dl"), "--sample", "3", "--verify",
                 "--json", str(tmp_path / "stats.json")]) == 0
    out = capsys.readouterr().out
    assert "shards           3   rows 27" in out and "status           ok: 24, http_error: 3" in out
    assert "consistency      OK (verified" in out
    assert out.count("key='synthetic/") == 3 and "sample rows (3)" in out
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["rows"] == 27 and stats["status"] == {"ok": 24, "http_error": 3}


def test_verify_exit_code_names_bad_shards(corpus, tmp_path, capsys):
    root = tmp_path / "bad"
    write_download_set(str(root), corpus)
    corrupt_middle(root / shard_name(0))
    (root / shard_name(2)).unlink()
    assert main(["shards", "inspect", str(root)]) == 0          # without --verify: report only
    capsys.readouterr()
    assert main(["shards", "inspect", str(root), "--verify"]) == 1
    out = capsys.readouterr().out
    assert f"! {shard_name(0)}: sha256" in out and "(corrupted)" in out
    assert f"! {shard_name(2)}: listed in the manifest but missing from storage" in out
    assert shard_name(1) + ":" not in out


def test_empty_path_is_a_clear_error(tmp_path, capsys):
    assert main(["shards", "inspect", str(tmp_path / "nothing")]) == 1
    assert "holds no committed shards" in capsys.readouterr().err


def test_cli_on_s3_writes_html(corpus, s3_bucket, tmp_path):
    uri = s3_bucket + "/capfilt"
    write_capfilt_set(uri, corpus)
    out_html = tmp_path / "report.html"
    proc = subprocess.run([sys.executable, "-m", "orchestration.cli", "shards", "inspect", uri, "--verify",
                           "--html", str(out_html), "--thumbnails", "6"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # moto env is inherited
    assert proc.returncode == 0, proc.stderr
    assert f"shard set        {uri}" in proc.stdout and f"contract         {CAPFILT.tag}" in proc.stdout
    assert "original kept    8/24 rows (33.3%)" in proc.stdout
    page = out_html.read_text()
    assert page.count("class='thumb' src='data:image/jpeg;base64,") == 6
    assert corpus[1][0].caption in page


def test_export_command_prints_the_open_clip_recipe(corpus, tmp_path, capsys, ray_local):
    write_capfilt_set(str(tmp_path / "cf"), corpus, shards=2, per_shard=4)
    assert main(["shards", "export", str(tmp_path / "cf"), str(tmp_path / "wds")]) == 0
    out = capsys.readouterr().out
    assert f"--train-data '{tmp_path}/wds/{{00000..00001}}.tar' --train-num-samples 8" in out
    assert sorted(p.name for p in (tmp_path / "wds").iterdir()) == ["00000.tar", "00001.tar", "sizes.json"]
    assert main(["shards", "export", str(tmp_path / "nothing-here"), str(tmp_path / "wds2")]) == 2
