"""`blip2 curate` from the command line: key=value overrides reach the filters, bad input exits 2."""
from __future__ import annotations

import json

from orchestration.cli import main
from pipelines.shardio import ShardSet
from tests.helpers.curation import write_curation_input


def test_curate_cli_with_overrides(ray_local, corpus, tmp_path, capsys):
    data = write_curation_input(str(tmp_path / "in"), corpus)
    out = str(tmp_path / "out")
    assert main(["curate", "--input", data.uri, "--output", out, "--json", "curate.semdedup.enabled=false",
                 "curate.clip_score.quantile=0.2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["set"]["by_reason"]["near_duplicate"] == 0 and summary["set"]["by_reason"]["clip_score"] == 7  # 10th lowest ties at 0.23
    assert summary["set"]["rows_in"] == 47 and summary["set"]["accounted"]
    manifest = ShardSet(out).read_manifest()
    assert manifest["config"]["curate"]["clip_score"]["quantile"] == 0.2
    assert main(["curate", "--input", data.uri, "--output", out]) == 2        # other settings, same output
    assert "other filters" in capsys.readouterr().err
    assert main(["curate", "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o2")]) == 2
    assert "no committed shards" in capsys.readouterr().err
    assert main(["curate", "curate.semdedup.probes=0"]) == 2
    assert "probes" in capsys.readouterr().err
