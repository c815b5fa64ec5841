import urllib.request

from PIL import Image

from pipelines.synthetic import COLORS, load_corpus, make_corpus


def test_corpus_is_deterministic_and_captions_are_true(tmp_path):
    a = make_corpus(tmp_path / "a", n=12, seed=3)
    b = make_corpus(tmp_path / "b", n=12, seed=3)
    assert [i.caption for i in a] == [i.caption for i in b]
    assert (tmp_path / "a/images/000005.jpg").read_bytes() == (tmp_path / "b/images/000005.jpg").read_bytes()
    assert load_corpus(tmp_path / "a") == a
    c = make_corpus(tmp_path / "c", n=12, seed=4)
    assert [i.caption for i in a] != [i.caption for i in c]
    for item in a:
        img = Image.open(tmp_path / "a" / item.file).convert("RGB")
        assert item.caption.startswith(f"a {item.colors[0]} {item.shapes[0]}")
        # the named colours are really drawn
        pixels = set(img.getdata())
        for colour in item.colors:
            r, g, b_ = COLORS[colour]
            assert any(abs(p[0] - r) + abs(p[1] - g) + abs(p[2] - b_) < 60 for p in pixels), item


def test_http_server_serves_corpus_and_hostile_routes(corpus, http_server):
    root, items = corpus
    with urllib.request.urlopen(f"{http_server.base_url}/{items[0].file}", timeout=5) as r:
        assert r.read() == (root / items[0].file).read_bytes()
    try:
        urllib.request.urlopen(f"{http_server.base_url}/status/500", timeout=5)
        raise AssertionError("expected HTTP 500")
    except urllib.error.HTTPError as e:
        assert e.code == 500
