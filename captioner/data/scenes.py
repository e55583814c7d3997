"""What a scene of the shapes world is made of: its vocabulary and the spatial relation of two objects.

The generator (`captioner.data.shapes`) draws scenes from these; the semantic scorer
(`captioner.scoring.semantic`) reads captions against them, without importing the generator.
"""

from __future__ import annotations

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
RELATIONS = ("left", "right", "above", "below")
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
AXIS = {"left": "x", "right": "x", "above": "y", "below": "y"}

OBJECT_VOCAB: dict[str, tuple[str, ...]] = {
    "shapes": SHAPES,
    "colours": COLOURS,
    "sizes": SIZES,
    "relations": RELATIONS,
}

Scene = dict  # {"objects": [{"shape","colour","size","x","y","r","angle"}, ...], "relations": [[i, rel, j], ...]}


def relation_between(a: dict, b: dict) -> str:
    """The relation of object `a` to object `b` along the dominant axis ("above" = smaller y, y grows down)."""
    dx, dy = b["x"] - a["x"], b["y"] - a["y"]
    if abs(dx) >= abs(dy):
        return "left" if a["x"] < b["x"] else "right"
    return "above" if a["y"] < b["y"] else "below"
