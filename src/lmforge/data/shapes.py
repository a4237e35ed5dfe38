"""Test fixture: a synthetic image task with checkable answers, one coloured shape on a white
canvas. Not part of the user-facing API; only the tests use it (`tests/conftest.py`'s shapes data
and the vision-language tests in `tests/methods/` and `tests/pipeline/`).

Each image shows a circle, square or triangle in red, green, blue or yellow, at a random place
and size. Questions ask for its colour or its shape, and the answer is one word. Written as
image-text records (`messages` with an `<image>` placeholder and an `images` list relative to the
data folder), the layout users give lmforge for Qwen2-VL.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is it?"}


def draw(shape: str, colour: str, size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    extent = rng.randint(size // 2, size - 4)
    x, y = rng.randint(0, size - extent), rng.randint(0, size - extent)
    box = (x, y, x + extent - 1, y + extent - 1)
    pen = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(x + extent // 2, y), (x, y + extent - 1), (x + extent - 1, y + extent - 1)], fill=fill)
    return image


def write_shapes_task(folder: Path, n: int, seed: int = 0, size: int = 56, ask: str = "colour") -> Path:
    """`n` images under folder/images and folder/data.json with one question per image."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        name = f"images/{seed}-{i:04d}.png"
        draw(shape, colour, size, rng).save(folder / name)
        records.append(
            {
                "messages": [
                    {"role": "user", "content": f"<image>{QUESTIONS[ask]}"},
                    {"role": "assistant", "content": colour if ask == "colour" else shape},
                ],
                "images": [name],
            }
        )
    path = folder / "data.json"
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path
