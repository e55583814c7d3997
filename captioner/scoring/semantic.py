"""Semantic scores of captions of the shapes world: each caption is parsed against the scene it describes.

Next to the n-gram metrics, these say whether a caption names the right objects, sizes and spatial relations
(`score_captions`); `parse_caption` is the parser they use, for references and model outputs alike. The
world's vocabulary comes from `captioner.data.scenes`, so scoring never imports the generator.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from ..data.scenes import AXIS, COLOURS, SHAPES, SIZES, Scene, relation_between
from ..data.vocabulary import tokenize

# Words the parser reads as a relation (a relation keyword needs a following "of" for left/right).
_REL_WORDS = {"above": "above", "over": "above", "below": "below", "under": "below", "beneath": "below"}


@dataclass
class ParsedCaption:
    """Object mentions (size or None, colour, shape) in order of mention, and the stated relations as
    (index of subject mention, relation, index of object mention)."""

    objects: list[tuple[str | None, str, str]] = field(default_factory=list)
    relations: list[tuple[int, str, int]] = field(default_factory=list)


def parse_caption(text: str) -> ParsedCaption:
    """Parse a caption (reference or model output) into mentions and relations; unknown words are ignored.

    A mention is a colour word directly followed by a shape word, optionally preceded by a size word.
    A relation is "left of"/"right of" (any "to the"/"on the" before it is just ignored) or one of
    above/over/below/under/beneath; its subject is the last mention before it and its object the first
    mention after it (a relation without both is dropped).
    """
    toks = tokenize(text)
    out = ParsedCaption()
    pending: list[tuple[int, str]] = []  # (subject mention index, relation) waiting for their object
    i = 0
    while i < len(toks):
        t = toks[i]
        if t in COLOURS and i + 1 < len(toks) and toks[i + 1] in SHAPES:
            size = toks[i - 1] if i > 0 and toks[i - 1] in SIZES else None
            out.objects.append((size, t, toks[i + 1]))
            idx = len(out.objects) - 1
            out.relations.extend((s, rel, idx) for s, rel in pending)
            pending = []
            i += 2
            continue
        rel = None
        if t in ("left", "right") and i + 1 < len(toks) and toks[i + 1] == "of":
            rel, step = t, 2
        elif t in _REL_WORDS:
            rel, step = _REL_WORDS[t], 1
        if rel is not None:
            if out.objects:
                pending.append((len(out.objects) - 1, rel))
            i += step
            continue
        i += 1
    return out


def score_captions(hypotheses: Sequence[str], scenes: Sequence[Scene]) -> dict[str, float]:
    """Score captions semantically against their scenes (one scene per hypothesis).

    object_accuracy: multiset of mentioned (colour, shape) equals the scene's exactly.
    size_rate: over mentions that match a scene object, fraction stating a size.
    size_accuracy: over those mentions stating a size, fraction with the right size.
    relation_rate: over captions of multi-object scenes, fraction stating a relation.
    relation_axis_accuracy / relation_accuracy: over captions of multi-object scenes that state a relation,
        fraction whose relations all have both mentions matching (distinct) scene objects and the right axis /
        the right direction.
    relation_correct: over captions of multi-object scenes, fraction stating relations that are all right (the
        accuracy times the rate: a caption that states no relation counts as wrong, so stating less never helps).
    direction_accuracy: over stated relations between two distinct scene objects, fraction with the right
        direction: relations judged apart from object recognition (a wrong object leaves the relation out).
    count_accuracy: number of distinct mentioned (colour, shape) equals the number of scene objects.
    An empty denominator gives 0.0.
    """
    if len(hypotheses) != len(scenes):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(scenes)} scenes")
    n_obj = n_count = 0
    size_mentions = size_total = size_right = 0
    multi = stated = axis_right = rel_right = 0
    grounded = direction_right = 0
    for text, scene in zip(hypotheses, scenes):
        objs = scene["objects"]
        index = {(o["colour"], o["shape"]): k for k, o in enumerate(objs)}
        parsed = parse_caption(text)
        mentioned = [(c, s) for _, c, s in parsed.objects]
        n_obj += Counter(mentioned) == Counter(list(index))
        n_count += len(set(mentioned)) == len(objs)
        for size, c, s in parsed.objects:
            size_mentions += (c, s) in index
            if size is not None and (c, s) in index:
                size_total += 1
                size_right += objs[index[(c, s)]]["size"] == size
        if len(objs) >= 2:
            multi += 1
            if parsed.relations:
                stated += 1
                ok_axis = ok_dir = True
                for si, rel, oi in parsed.relations:
                    a, b = index.get(mentioned[si]), index.get(mentioned[oi])
                    if a is None or b is None or a == b:
                        ok_axis = ok_dir = False
                        continue
                    truth = relation_between(objs[a], objs[b])
                    ok_axis &= AXIS[truth] == AXIS[rel]
                    ok_dir &= truth == rel
                    grounded += 1
                    direction_right += truth == rel
                axis_right += ok_axis
                rel_right += ok_dir
    n = len(hypotheses)

    def frac(num: int, den: int) -> float:
        return float(num) / den if den else 0.0

    return {
        "object_accuracy": frac(n_obj, n),
        "size_rate": frac(size_total, size_mentions),
        "size_accuracy": frac(size_right, size_total),
        "relation_rate": frac(stated, multi),
        "relation_axis_accuracy": frac(axis_right, stated),
        "relation_accuracy": frac(rel_right, stated),
        "relation_correct": frac(rel_right, multi),
        "direction_accuracy": frac(direction_right, grounded),
        "count_accuracy": frac(n_count, n),
    }
