"""The embedded default corpus: coloured shapes with true captions, deterministic by seed.

Used by the demo and the tests in place of the web: ``make_corpus`` draws images such as
"a red circle above a blue square" and writes them with a ``captions.jsonl`` index;
``serve_directory`` serves a folder on 127.0.0.1 so the real download job can fetch it.
"""
from __future__ import annotations

import functools
import json
import random
import threading
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (250, 130, 10),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("above", "below", "left of", "right of")


@dataclass(frozen=True)
class Item:
    index: int
    file: str
    caption: str
    colors: tuple[str, ...]
    shapes: tuple[str, ...]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, color, cx: float, cy: float, r: float):
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)


def draw_item(rng: random.Random, size: int) -> tuple[Image.Image, str, tuple, tuple]:
    """One image and its true caption. Two thirds of the images hold two shapes."""
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    c1, s1 = rng.choice(list(COLORS)), rng.choice(SHAPES)
    if rng.random() < 1 / 3:
        r = size * rng.uniform(0.2, 0.3)
        cx, cy = (size / 2 + rng.uniform(-0.1, 0.1) * size for _ in range(2))
        _draw_shape(draw, s1, COLORS[c1], cx, cy, r)
        return img, f"a {c1} {s1}", (c1,), (s1,)
    c2 = rng.choice([c for c in COLORS if c != c1])
    s2 = rng.choice(SHAPES)
    rel = rng.choice(RELATIONS)
    r = size * rng.uniform(0.12, 0.18)
    near, far = size * 0.28, size * 0.72
    mid = size / 2 + rng.uniform(-0.08, 0.08) * size
    # (first, second) centres so that "first <rel> second" is true.
    pos = {
        "above": ((mid, near), (mid, far)),
        "below": ((mid, far), (mid, near)),
        "left of": ((near, mid), (far, mid)),
        "right of": ((far, mid), (near, mid)),
    }[rel]
    _draw_shape(draw, s1, COLORS[c1], *pos[0], r)
    _draw_shape(draw, s2, COLORS[c2], *pos[1], r)
    return img, f"a {c1} {s1} {rel} a {c2} {s2}", (c1, c2), (s1, s2)


def make_corpus(out_dir: str | Path, n: int, seed: int = 0, size: int = 96) -> list[Item]:
    """Write ``n`` JPEGs under ``out_dir/images`` and ``out_dir/captions.jsonl``; same seed, same bytes."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    items = []
    with open(out / "captions.jsonl", "w") as index:
        for i in range(n):
            img, caption, colors, shapes = draw_item(rng, size)
            file = f"images/{i:06d}.jpg"
            img.save(out / file, format="JPEG", quality=90)
            item = Item(i, file, caption, colors, shapes)
            items.append(item)
            index.write(json.dumps(item.__dict__) + "\n")
    return items


def load_corpus(corpus_dir: str | Path) -> list[Item]:
    with open(Path(corpus_dir) / "captions.jsonl") as f:
        return [Item(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(line).items()})
                for line in f]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test and demo output readable
        pass


def serve_directory(root: str | Path, host: str = "127.0.0.1", port: int = 0,
                    handler: type[SimpleHTTPRequestHandler] = _QuietHandler) -> ThreadingHTTPServer:
    """Serve ``root`` over HTTP in a daemon thread. ``server.base_url`` is set; call ``shutdown()``."""
    server = ThreadingHTTPServer((host, port), functools.partial(handler, directory=str(root)))
    server.daemon_threads = True
    server.base_url = f"http://{host}:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, name="corpus-http", daemon=True).start()
    return server
