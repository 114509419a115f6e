"""A tiny procedural world of captioned images: one coloured shape on a plain background.

Every image is drawn with Pillow at 4x resolution and downsampled (antialiased edges), so
it is a deterministic function of its attributes and a seed. Captions name the attributes
in varied wording; `parse_caption` inverts any caption back to the attributes it names.

The attribute combinations are split once: a fixed ~1/8 of all (colour, shape, size,
position, background) tuples is *held out* and never drawn for training, so evaluation
prompts ask for combinations the model has not seen together.

    img, text, attrs = sample(0, split="train")
    prompts = eval_prompts(300)            # held-out captions, fully specified
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32  # pixels per side of a world image
_SUPERSAMPLE = 4  # drawn at 4x and downsampled for antialiased edges

# Attribute vocabularies. Colours are RGB centres; each image jitters them a little.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (240, 225, 40),
    "green": (40, 175, 60),
    "blue": (35, 75, 225),
    "purple": (135, 50, 195),
    "pink": (245, 120, 190),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES: dict[str, float] = {"small": 10.0, "large": 18.0}  # side / diameter in pixels
POSITIONS: dict[str, tuple[float, float]] = {  # centre (x, y) in pixels
    "left": (9.5, 16.0),
    "right": (22.5, 16.0),
    "top": (16.0, 9.5),
    "bottom": (16.0, 22.5),
    "center": (16.0, 16.0),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (18, 18, 22),
    "gray": (125, 125, 125),
    "white": (238, 238, 235),
}
ATTRIBUTES = ("colour", "shape", "size", "position", "background")
VALUES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}


@dataclass(frozen=True)
class Attributes:
    """What one image shows."""

    colour: str
    shape: str
    size: str
    position: str
    background: str

    def __post_init__(self) -> None:
        for name in ATTRIBUTES:
            if getattr(self, name) not in VALUES[name]:
                raise ValueError(
                    f"unknown {name} {getattr(self, name)!r}; pick one of {VALUES[name]}"
                )

    def labels(self) -> tuple[int, ...]:
        """Class index of every attribute, in ATTRIBUTES order."""
        return tuple(VALUES[n].index(getattr(self, n)) for n in ATTRIBUTES)


def all_combinations() -> list[Attributes]:
    """Every attribute tuple of the world (7*4*2*5*3 = 840)."""
    return [Attributes(*t) for t in itertools.product(*(VALUES[n] for n in ATTRIBUTES))]


def is_held_out(attrs: Attributes) -> bool:
    """True for the fixed ~1/8 of combinations reserved for evaluation."""
    key = "|".join(asdict(attrs).values()).encode()
    return hashlib.sha256(key).digest()[0] % 8 == 0


# ---------------------------------------------------------------------------- drawing


def _shape_polygon(shape: str, cx: float, cy: float, s: float) -> list[tuple[float, float]]:
    h = s / 2
    if shape == "square":
        h *= 0.9  # a square of equal side looks bigger than a circle
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h * 0.85), (cx - h, cy + h * 0.85)]
    if shape == "cross":
        t = s / 6  # half the bar thickness
        return [
            (cx - t, cy - h), (cx + t, cy - h), (cx + t, cy - t), (cx + h, cy - t),
            (cx + h, cy + t), (cx + t, cy + t), (cx + t, cy + h), (cx - t, cy + h),
            (cx - t, cy + t), (cx - h, cy + t), (cx - h, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    raise ValueError(f"no polygon for shape {shape!r}")


def render(attrs: Attributes, seed: int = 0) -> Image.Image:
    """Draw one IMAGE_SIZE x IMAGE_SIZE RGB image of `attrs`; jitter depends only on `seed`.

    Args:
        attrs: what to draw.
        seed: jitter seed (position +-1.5 px, size +-8%, colours +-12 per channel).
    """
    rng = np.random.default_rng(seed)
    k = _SUPERSAMPLE
    jit = rng.integers(-12, 13, size=6)
    bg = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(BACKGROUNDS[attrs.background], jit[:3], strict=True))
    fg = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[attrs.colour], jit[3:], strict=True))
    cx, cy = POSITIONS[attrs.position]
    cx, cy = cx + rng.uniform(-1.5, 1.5), cy + rng.uniform(-1.5, 1.5)
    s = SIZES[attrs.size] * rng.uniform(0.92, 1.08)
    img = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), bg)
    draw = ImageDraw.Draw(img)
    if attrs.shape == "circle":
        r = s / 2 * k
        draw.ellipse([cx * k - r, cy * k - r, cx * k + r, cy * k + r], fill=fg)
    else:
        draw.polygon([(x * k, y * k) for x, y in _shape_polygon(attrs.shape, cx, cy, s)], fill=fg)
    return img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


# ---------------------------------------------------------------------------- captions

# Words used for each value; the first is the canonical one. Every word maps to one value.
SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "colour": {c: (c,) for c in COLOURS} | {"gray": ("gray",)},
    "shape": {
        "circle": ("circle", "disk", "dot"),
        "square": ("square", "box", "block"),
        "triangle": ("triangle", "wedge"),
        "cross": ("cross", "plus"),
    },
    "size": {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")},
    "position": {
        "left": ("left",),
        "right": ("right",),
        "top": ("top", "upper"),
        "bottom": ("bottom", "lower"),
        "center": ("center", "middle", "centre"),
    },
}
del SYNONYMS["colour"]["gray"]  # "gray" names a background only

_POSITION_PHRASES = {
    "left": ("on the left", "at the left", "to the left", "in the left half"),
    "right": ("on the right", "at the right", "to the right", "in the right half"),
    "top": ("at the top", "near the top", "in the upper half", "up at the top"),
    "bottom": ("at the bottom", "near the bottom", "in the lower half", "down at the bottom"),
    "center": ("in the center", "in the middle", "at the centre", "right in the middle"),
}
_BACKGROUND_PHRASES = (
    "on a {bg} background", "against a {bg} background", "on {bg}", "over a {bg} backdrop",
)  # fmt: skip
_TEMPLATES = (
    "a {size} {colour} {shape} {pos} {bg}",
    "{size} {colour} {shape} {pos} {bg}",
    "a picture of a {size} {colour} {shape} {pos} {bg}",
    "an image with a {size} {colour} {shape} {pos} {bg}",
    "there is a {size} {colour} {shape} {pos} {bg}",
    "a {colour} {shape} , {size} , {pos} {bg}",
    "{bg_front} , a {size} {colour} {shape} {pos}",
    "one {size} {colour} {shape} {pos} {bg}",
)
_BG_FRONT = ("{bg} background", "a {bg} background", "on {bg}")


def caption(attrs: Attributes, rng: random.Random, drop: float = 0.0) -> str:
    """A caption of `attrs` in a randomly chosen wording.

    Args:
        attrs: the attributes to name.
        rng: the source of wording choices.
        drop: probability of leaving out each of size, position and background
            (colour and shape are always named).
    """
    size = rng.choice(SYNONYMS["size"][attrs.size]) if rng.random() >= drop else ""
    pos = rng.choice(_POSITION_PHRASES[attrs.position]) if rng.random() >= drop else ""
    has_bg = rng.random() >= drop
    template = rng.choice(_TEMPLATES)
    bg = rng.choice(_BACKGROUND_PHRASES).format(bg=attrs.background) if has_bg else ""
    bg_front = rng.choice(_BG_FRONT).format(bg=attrs.background) if has_bg else ""
    text = template.format(
        size=size, colour=attrs.colour, shape=rng.choice(SYNONYMS["shape"][attrs.shape]),
        pos=pos, bg=bg, bg_front=bg_front,
    )  # fmt: skip
    words = text.replace(" , ,", " ,").split()
    words = [w for i, w in enumerate(words) if not (w == "," and (i == 0 or i == len(words) - 1))]
    return " ".join(words).replace(" ,", ",")


_WORD_TO_VALUE = {
    w: (name, value)
    for name, table in SYNONYMS.items()
    for value, words in table.items()
    for w in words
}


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a caption names, as {attribute: value}.

    The background is the colour word right before "background"/"backdrop" or after "on";
    "right in the middle" is read as center.
    """
    words = text.lower().replace(",", " ").split()
    out: dict[str, str] = {}
    for i, w in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        prev = words[i - 1] if i > 0 else ""
        if w in BACKGROUNDS and (nxt in ("background", "backdrop") or prev == "on"):
            out["background"] = w
        elif w == "right" and nxt == "in":
            continue  # "right in the middle"
        elif w in _WORD_TO_VALUE:
            name, value = _WORD_TO_VALUE[w]
            out.setdefault(name, value)
    return out


def vocabulary() -> list[str]:
    """Every word any caption can use, sorted."""
    words: set[str] = set()
    for table in SYNONYMS.values():
        for ws in table.values():
            words.update(ws)
    for phrases in _POSITION_PHRASES.values():
        for p in phrases:
            words.update(p.split())
    for p in _BACKGROUND_PHRASES + _BG_FRONT:
        words.update(p.format(bg="").split())
    for t in _TEMPLATES:
        words.update(w for w in t.split() if "{" not in w)
    words.update(BACKGROUNDS)
    words.update(COLOURS)
    return sorted(words)


# ---------------------------------------------------------------------------- splits

_TRAIN = [a for a in all_combinations() if not is_held_out(a)]
_HELD_OUT = [a for a in all_combinations() if is_held_out(a)]


def combinations(split: str) -> list[Attributes]:
    """The attribute tuples of a split: "train" or "heldout"."""
    if split == "train":
        return list(_TRAIN)
    if split == "heldout":
        return list(_HELD_OUT)
    raise ValueError(f"unknown split {split!r}; use 'train' or 'heldout'")


def sample(
    index: int, split: str = "train", seed: int = 0, drop: float = 0.2
) -> tuple[Image.Image, str, Attributes]:
    """The `index`-th (image, caption, attributes) of a split; a pure function of its arguments.

    Args:
        index: sample number (any non-negative int).
        split: "train" or "heldout".
        seed: world seed; another seed gives another stream.
        drop: probability of leaving an optional attribute out of the caption.
    """
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    combos = combinations(split)
    rng = random.Random(f"{split}/{seed}/{index}")
    attrs = rng.choice(combos)
    return render(attrs, seed=rng.getrandbits(32)), caption(attrs, rng, drop), attrs


def images_and_labels(
    n: int, split: str = "train", seed: int = 0, start: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """`n` images as uint8 (n, 3, H, W) and their labels as int64 (n, 5) in ATTRIBUTES order."""
    imgs = np.empty((n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    labels = np.empty((n, len(ATTRIBUTES)), dtype=np.int64)
    for i in range(n):
        img, _, attrs = sample(start + i, split, seed)
        imgs[i] = np.asarray(img).transpose(2, 0, 1)
        labels[i] = attrs.labels()
    return imgs, labels


def eval_prompts(n: int = 300, seed: int = 0) -> list[tuple[str, Attributes]]:
    """`n` fully specified captions of held-out combinations (each combination in turn, shuffled).

    Args:
        n: number of prompts.
        seed: wording seed.
    """
    rng = random.Random(f"eval/{seed}")
    combos = combinations("heldout")
    rng.shuffle(combos)  # any prefix of the list mixes colours and shapes
    return [(caption(combos[i % len(combos)], rng, 0.0), combos[i % len(combos)]) for i in range(n)]
