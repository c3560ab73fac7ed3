"""The demo's captions: five distinct captions per scene, 2-3 complete and the rest partial (avg.data.demo)."""
from __future__ import annotations

import random
from typing import Callable

from avg.data.demo.scenes import (BG_COLOUR_WORDS, COLOUR_WORDS, COUNT_WORDS, POSITION_WORDS, PREFIXES, SHAPE_WORDS,
                                  SIZE_WORDS, THING_WORDS, Background, Scene, SceneObject)
from avg.data.karpathy import tokenize_caption

# --- captions -----------------------------------------------------------------------------------
def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _obj(rng, o: SceneObject, *, size=True, colour=True) -> str:
    words = ([rng.choice(SIZE_WORDS[o.size])] if size else []) + \
            ([rng.choice(COLOUR_WORDS[o.colour])] if colour else []) + [rng.choice(SHAPE_WORDS[o.shape])]
    return _article(" ".join(words))


def _pos(rng, o: SceneObject) -> str:
    return rng.choice(POSITION_WORDS[o.cell])


def _bg(rng, bg: Background) -> str:
    names = [rng.choice(BG_COLOUR_WORDS[c]) for c in bg.colours]
    if bg.kind == "plain":
        return rng.choice((f"a plain {names[0]} background", f"a {names[0]} background",
                           f"a solid {names[0]} backdrop"))
    if bg.kind == "noise":
        return rng.choice((f"a noisy {names[0]} background", f"a grainy {names[0]} background",
                           "a speckled background", "a noisy background"))
    if bg.kind == "gradient":
        return rng.choice(("a gradient background", f"a {names[0]} to {names[1]} gradient",
                           f"a {bg.direction} gradient from {names[0]} to {names[1]}"))
    return rng.choice(("a striped background", f"{bg.direction} {names[0]} and {names[1]} stripes",
                       f"a background of {bg.direction} stripes", "stripes"))


def _relation(rng, a: SceneObject, b: SceneObject) -> str:
    """A true spatial relation of a to b on the grid."""
    (ra, ca), (rb, cb) = a.cell, b.cell
    vert = "above" if ra < rb else "below" if ra > rb else ""
    horiz = "to the left of" if ca < cb else "to the right of" if ca > cb else ""
    options = []
    if vert:
        options += [vert] + (["over"] if vert == "above" else ["under", "beneath"])
    if horiz:
        options += [horiz, horiz.replace("to the ", "")]
    if vert and horiz:
        options.append(f"{vert} and {horiz}")
    if max(abs(ra - rb), abs(ca - cb)) == 1 and not vert:
        options += ["next to", "beside"]
    return rng.choice(options)


def _maybe_bg(rng, sc: Scene, text: str, p: float = 0.5) -> str:
    return f"{text} on {_bg(rng, sc.background)}" if rng.random() < p else text


# Complete captions: every object with its size, colour and shape.
def _full_positions(rng, sc):
    return _maybe_bg(rng, sc, _join([f"{_obj(rng, o)} {_pos(rng, o)}" for o in sc.objects]), 0.6)


def _full_relations(rng, sc):
    if len(sc.objects) < 2:
        return None
    objs = rng.sample(sc.objects, len(sc.objects))
    text = f"{_obj(rng, objs[0])} {_relation(rng, objs[0], objs[1])} {_obj(rng, objs[1])}"
    if len(objs) == 3:
        text += rng.choice((", and ", " with ", ", plus ")) + f"{_obj(rng, objs[2])} {_pos(rng, objs[2])}"
    return _maybe_bg(rng, sc, text, 0.4)


def _count_list(rng, sc):
    n = len(sc.objects)
    count, things = rng.choice(COUNT_WORDS[n]), rng.choice(THING_WORDS)
    if n == 1:
        things = things[:-1]
    items = _join([_obj(rng, o) for o in rng.sample(sc.objects, n)])
    return _maybe_bg(rng, sc, rng.choice((f"{count} {things}: {items}", f"{count} {things}, {items}")), 0.5)


# Partial captions: some objects or some attributes only.
def _one_with_bg(rng, sc):
    return f"{_obj(rng, rng.choice(sc.objects), size=rng.random() < 0.5)} on {_bg(rng, sc.background)}"


def _count_one(rng, sc):
    n = len(sc.objects)
    if n < 2:
        return None
    o = _obj(rng, rng.choice(sc.objects), size=rng.random() < 0.5)
    count, things = COUNT_WORDS[n][0], rng.choice(THING_WORDS)
    others = f"{COUNT_WORDS[n - 1][0]} other {things if n > 2 else things[:-1]}"
    return rng.choice((f"{count} {things}, one of them {o}", f"{count} {things} including {o}",
                       f"{o} and {others}"))


def _one_position(rng, sc):
    if len(sc.objects) < 2:
        return None
    o = rng.choice(sc.objects)
    return f"{_obj(rng, o, size=rng.random() < 0.6)} {_pos(rng, o)}"


def _colours_only(rng, sc):
    colours = list(dict.fromkeys(o.colour for o in sc.objects))
    words = [rng.choice(COLOUR_WORDS[c]) for c in colours]
    if len(sc.objects) == 1:
        text = f"{_article(words[0])} shape"
    elif len(colours) == 1:
        text = f"{COUNT_WORDS[len(sc.objects)][0]} {words[0]} shapes"
    else:
        text = f"{_join(words)} shapes"
    return f"{text} on {_bg(rng, sc.background)}"


def _shapes_only(rng, sc):
    if len({o.shape for o in sc.objects}) < len(sc.objects):
        return None     # "a circle and a circle" reads badly; other templates cover this scene
    return _maybe_bg(rng, sc, _join([_article(rng.choice(SHAPE_WORDS[o.shape])) for o in sc.objects]), 0.5)


def _pair_relation(rng, sc):
    if len(sc.objects) < 2:
        return None
    a, b = rng.sample(sc.objects, 2)
    return (f"{_obj(rng, a, size=rng.random() < 0.5)} {_relation(rng, a, b)} "
            f"{_obj(rng, b, size=rng.random() < 0.5, colour=rng.random() < 0.7)}")


COMPLETE_TEMPLATES: tuple[Callable, ...] = (_full_positions, _full_relations, _count_list)
PARTIAL_TEMPLATES: tuple[Callable, ...] = (_one_with_bg, _count_one, _one_position, _colours_only,
                                           _shapes_only, _pair_relation)


def _normal_form(text: str) -> str:
    return " ".join(tokenize_caption(text))


def make_captions(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
    """`n` captions that differ as word sequences: 2-3 complete, the rest partial, shuffled."""
    n_complete = rng.choice((2, 2, 3))
    out, seen, used = [], set(), set()
    for attempt in range(1000):
        if len(out) == n:
            break
        pool = COMPLETE_TEMPLATES if len(out) < n_complete or attempt > 200 else PARTIAL_TEMPLATES
        fresh = [t for t in pool if t not in used]      # vary the template before reusing one
        template = rng.choice(fresh if fresh and attempt < 100 else pool)
        text = template(rng, scene)
        if text is None:
            used.add(template)
            continue
        if rng.random() < 0.35:
            prefix = rng.choice(PREFIXES)
            if prefix == "there is " and not text.startswith(("a ", "an ", "one ")):
                prefix = "there are "
            text = prefix + text
        if _normal_form(text) in seen:
            continue
        seen.add(_normal_form(text))
        used.add(template)
        if rng.random() < 0.5:
            text = text[0].upper() + text[1:]
        if rng.random() < 0.5:
            text += "."
        out.append(text)
    if len(out) < n:   # cannot happen with the vocabulary above; guard against future edits
        raise RuntimeError(f"could not make {n} distinct captions for {scene}")
    rng.shuffle(out)
    return out
