"""The download plan: owners of repeated URLs, human captions merged, partitions and keys per file."""
from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pytest

from pipelines.config import DownloadConfig
from pipelines.download_plan import BUCKET_SCHEMA, ROW_BITS, find_owners, make_plan, row_id
from pipelines.shardio import ShardSet
from pipelines.sources import open_url_lists


def reference_marks(rows):
    """Plain Python: rows (id, url, human, captions) in id order -> {id: (kind, owner, captions)}."""
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(r[1], []).append(r)
    out = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        owner = next((m for m in members if m[2]), members[0])
        for m in members:
            if m is not owner:
                out[m[0]] = ("merged" if m[2] and owner[2] else "duplicate", owner[0], None)
        if owner[2] and any(m[2] for m in members if m is not owner):
            out[owner[0]] = ("owner", owner[0], [c for m in [owner] + [m for m in members if m is not owner and m[2]]
                                               for c in m[3]])
    return out


def test_owners_match_a_plain_python_reference():
    import hashlib

    rng = random.Random(0)
    rows = []
    for i in range(3000):
        unit = i // 1000
        human = unit == 1  # the middle file is a human source: it owns URLs the web files repeat
        url = f"http://h.example/{rng.randrange(700)}.jpg"
        rows.append((row_id(unit, i % 1000), url, human, [f"caption {i}"]))
    digests = [hashlib.blake2b(r[1].encode(), digest_size=16).digest() for r in rows]
    table = pa.table({"d0": [int.from_bytes(d[:8], "little") for d in digests],
                      "d1": [int.from_bytes(d[8:], "little") for d in digests],
                      "id": [r[0] for r in rows], "human": [r[2] for r in rows], "captions": [r[3] for r in rows]},
                     schema=BUCKET_SCHEMA)
    shuffled = table.take(pa.array(np.random.default_rng(1).permutation(len(rows))))  # arrival order does not matter
    marks = {m["id"]: (m["kind"], m["owner"], m["captions"]) for m in find_owners(shuffled).to_pylist()}
    want = reference_marks(rows)
    assert marks == want
    kinds = [k for k, _, _ in marks.values()]
    assert kinds.count("merged") > 100 and kinds.count("duplicate") > 1000 and kinds.count("owner") > 100
    assert all(owner >> ROW_BITS == 1 for k, owner, _ in marks.values() if k == "merged")


def test_plan_partitions_per_file_keys_across_files_and_merges_human_captions(tmp_path, ray_local):
    lists_dir = tmp_path / "lists"
    lists_dir.mkdir()
    coco = [{"image": f"img/{i // 5}.jpg", "caption": f"human caption {i}"} for i in range(20)]  # 4 images x 5
    coco.insert(7, {"image": "img/9.jpg", "caption": ""})  # a bad caption never owns or merges
    (lists_dir / "coco_karpathy_train.json").write_text(json.dumps(coco))
    (lists_dir / "web_a.tsv").write_text("".join(f"http://w.example/{i % 4}.jpg\tweb {i}\n" for i in range(7)))
    (lists_dir / "web_b.tsv").write_text("http://127.0.0.1/img/0.jpg\trepeats a human image\n")
    lists = open_url_lists(str(lists_dir), "auto", url_prefix="http://127.0.0.1/")
    assert [f.source.name for f in lists.files] == ["coco", "cc12m", "cc12m"]
    cfg = DownloadConfig(rows_per_shard=6, output=str(tmp_path / "out"))
    plan = make_plan(lists, cfg, ShardSet(cfg.output), log=lambda m: None)

    assert [(u.rows, u.partitions, u.key_offset, u.shard_offset) for u in plan.units] == [
        (21, 4, 0, 0), (7, 2, 0, 4), (1, 1, 7, 6)]  # cc12m keys run on across its two files
    assert [(p.index, p.unit, p.rows) for p in plan.partitions()] == [
        (0, 0, 6), (1, 0, 6), (2, 0, 6), (3, 0, 3), (4, 1, 6), (5, 1, 1), (6, 2, 1)]
    marks = plan.marks(list(plan.partitions()))
    everything = {m["id"]: m for t in marks.values() for m in t.to_pylist()}
    keys = plan.keys()
    owners = {keys.key(i): m["captions"] for i, m in everything.items() if m["kind"] == "owner"}
    assert owners == {"coco/0": [f"human caption {i}" for i in range(5)],
                      "coco/5": ["human caption 5", "human caption 6"] + [f"human caption {i}" for i in range(7, 10)],
                      "coco/11": [f"human caption {i}" for i in range(10, 15)],
                      "coco/16": [f"human caption {i}" for i in range(15, 20)]}
    merged = sorted(keys.key(i) for i, m in everything.items() if m["kind"] == "merged")
    assert len(merged) == 16 and "coco/7" not in merged  # the empty caption stays a bad_caption row
    dups = {keys.key(i): keys.key(m["owner"]) for i, m in everything.items() if m["kind"] == "duplicate"}
    assert dups == {"cc12m/4": "cc12m/0", "cc12m/5": "cc12m/1", "cc12m/6": "cc12m/2", "cc12m/7": "coco/0"}
    assert plan.duplicates == 4 and plan.merged == 16
    assert json.loads((tmp_path / "out" / "_plan" / "plan.json").read_text())["units"][0]["rows"] == 21


@pytest.mark.parametrize("buckets", [1, 3])
def test_the_plan_is_the_same_whatever_the_bucket_count(tmp_path, ray_local, monkeypatch, buckets):
    import pipelines.download_plan as dp

    rng = random.Random(5)
    (tmp_path / "l.tsv").write_text("".join(f"http://h.example/{rng.randrange(40)}.jpg\tc{i}\n" for i in range(300)))
    monkeypatch.setattr(dp, "_estimated_rows", lambda lists: 300)
    monkeypatch.setattr(dp, "ROWS_PER_BUCKET", 300 // buckets + 1)
    plan = make_plan(open_url_lists(str(tmp_path / "l.tsv"), "cc12m"), DownloadConfig(rows_per_shard=50),
                     ShardSet(str(tmp_path / f"out{buckets}")), log=lambda m: None)
    assert plan.buckets == buckets
    marks = plan.marks(list(plan.partitions()))
    got = sorted((m["id"], m["kind"], m["owner"]) for t in marks.values() for m in t.to_pylist())
    first: dict[str, int] = {}
    want = []
    for i, line in enumerate((tmp_path / "l.tsv").read_text().splitlines()):
        url = line.split("\t")[0]
        if url in first:
            want.append((row_id(0, i), "duplicate", row_id(0, first[url])))
        first.setdefault(url, i)
    assert got == want and plan.duplicates == len(want) > 200
