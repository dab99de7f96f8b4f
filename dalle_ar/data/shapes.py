"""The built-in `shapes` set (spec: shared/specs/shapes.md, v1) and a pixel checker for it.

Coloured squares, circles and triangles on black, one object in a 3 x 3 grid cell or two small
objects in a spatial relation, with captions that fix every attribute. Three (colour, shape)
pairs never occur in training and do occur in validation, to measure compositional
generalisation. `check_image` judges any image, generated ones included, against a caption.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image

from .shards import to_rgb
from .writers import write_samples

CANVAS = 64
PALETTE = {
    "red": (220, 20, 20), "green": (20, 180, 20), "blue": (30, 60, 230), "yellow": (240, 220, 20),
    "purple": (150, 40, 200), "cyan": (20, 200, 220), "orange": (250, 130, 10), "white": (240, 240, 240),
}
COLORS = tuple(PALETTE)
SHAPES = ("square", "circle", "triangle")
SIZES = {"small": 14, "large": 26}
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
CELL_CENTRES = (11, 32, 53)  # 32 -/+ 21 px
JITTER = 3
RELATIONS = ("left of", "right of", "above", "below")
HELD_OUT = (("purple", "triangle"), ("orange", "square"), ("cyan", "circle"))
TWO_OBJECT_FRACTION = 0.25   # of the scenes hold two objects
PAIR_GAP = (22, 40)          # centre distance on the relation's axis (>= 22 by spec; <= 40 fits small boxes)
PAIR_OFFSET = 6              # largest centre offset on the other axis

ONE_TEMPLATES = ("a {size} {color} {shape} in the {place}", "{size} {color} {shape}, {place}",
                 "there is a {size} {color} {shape} in the {place}")
TWO_TEMPLATES = ("a {color1} {shape1} {relation} a {color2} {shape2}", "{color1} {shape1} {relation} {color2} {shape2}")


# ---- drawing ------------------------------------------------------------------------------------

def shape_mask(shape: str, side: int, cx: int, cy: int) -> np.ndarray:
    """Bool [64, 64]: the pixels of `shape` in the square box of `side` centred at (cx, cy)."""
    y, x = np.mgrid[0:CANVAS, 0:CANVAS] + 0.5  # pixel centres
    left, top = cx - side / 2, cy - side / 2
    box = (x >= left) & (x < left + side) & (y >= top) & (y < top + side)
    if shape == "square":
        return box
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= (side / 2) ** 2
    if shape == "triangle":  # apex at the top edge's middle, base on the bottom edge
        return box & (np.abs(x - cx) <= (y - top) / 2)
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def render(attrs: dict) -> np.ndarray:
    """uint8 [64, 64, 3] image of a scene's attributes (as stored in the shards' json)."""
    image = np.zeros((CANVAS, CANVAS, 3), np.uint8)
    for obj in attrs["objects"]:
        image[shape_mask(obj["shape"], obj["box"], *obj["center"])] = PALETTE[obj["color"]]
    return image


# ---- scenes and captions ------------------------------------------------------------------------

def _pick_pair(rng, split: str, exclude_color=None) -> tuple[str, str]:
    while True:
        color, shape = COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]
        if color != exclude_color and not (split == "train" and (color, shape) in HELD_OUT):
            return color, shape


def _one_object(rng, split: str, pair=None) -> dict:
    color, shape = pair or _pick_pair(rng, split)
    size = ("small", "large")[rng.integers(2)]
    side = SIZES[size]
    cell = int(rng.integers(len(CELLS)))
    lo, hi = side // 2, CANVAS - side // 2  # the box stays inside the canvas
    cx = int(np.clip(CELL_CENTRES[cell % 3] + rng.integers(-JITTER, JITTER + 1), lo, hi))
    cy = int(np.clip(CELL_CENTRES[cell // 3] + rng.integers(-JITTER, JITTER + 1), lo, hi))
    obj = {"color": color, "shape": shape, "size": size, "box": side, "center": [cx, cy], "place": CELLS[cell]}
    return {"objects": [obj]}


def _two_objects(rng, split: str) -> dict:
    c1, s1 = _pick_pair(rng, split)
    c2, s2 = _pick_pair(rng, split, exclude_color=c1)
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    side = SIZES["small"]
    lo, hi = side // 2, CANVAS - side // 2
    gap = int(rng.integers(PAIR_GAP[0], PAIR_GAP[1] + 1))
    off = int(rng.integers(-PAIR_OFFSET, PAIR_OFFSET + 1))
    a = int(rng.integers(lo, hi - gap + 1))                       # along the relation's axis
    b = int(rng.integers(lo + max(0, -off), hi - max(0, off) + 1))  # across it
    first, second = (a, a + gap), (b, b + off)
    if relation in ("right of", "below"):
        first = first[::-1]
    if relation in ("left of", "right of"):
        centers = [[first[0], second[0]], [first[1], second[1]]]
    else:
        centers = [[second[0], first[0]], [second[1], first[1]]]
    objects = [{"color": c, "shape": s, "size": "small", "box": side, "center": ctr}
               for (c, s), ctr in zip(((c1, s1), (c2, s2)), centers)]
    return {"objects": objects, "relation": relation}


def caption(attrs: dict, template: int = 0) -> str:
    """The caption of a scene; template 0 is the canonical form evaluation prompts use."""
    objs = attrs["objects"]
    if len(objs) == 1:
        return ONE_TEMPLATES[template].format(**objs[0])
    (o1, o2) = objs
    return TWO_TEMPLATES[template].format(color1=o1["color"], shape1=o1["shape"], relation=attrs["relation"],
                                          color2=o2["color"], shape2=o2["shape"])


def scenes(split: str, n: int, seed: int = 0):
    """The first n (attrs, caption) of a split; deterministic for (split, seed)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    rng = np.random.default_rng([seed, ("train", "val").index(split)])
    for i in range(n):
        if split == "val" and i < len(HELD_OUT):  # every val set, however small, has each held-out pair
            attrs = _one_object(rng, split, pair=HELD_OUT[i])
        elif rng.random() < TWO_OBJECT_FRACTION:
            attrs = _two_objects(rng, split)
        else:
            attrs = _one_object(rng, split)
        templates = ONE_TEMPLATES if len(attrs["objects"]) == 1 else TWO_TEMPLATES
        yield attrs, caption(attrs, int(rng.integers(len(templates))))


def val_captions(n: int, seed: int = 0) -> list[str]:
    """Canonical captions of the first n validation scenes (the first three are the held-out pairs)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [caption(attrs) for attrs, _ in scenes("val", n, seed)]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def generate_shapes(out, train_size: int = 20000, val_size: int = 1000, shard_size: int = 1000, seed: int = 0) -> dict:
    """Write shapes-train-*.tar and shapes-val-*.tar into `out`; byte-identical for the same arguments."""
    for name, value in (("train_size", train_size), ("val_size", val_size)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    summary = {"seed": seed}
    for split, n in (("train", train_size), ("val", val_size)):
        samples = ({"key": f"{split}_{i:07d}", "image": _png(render(attrs)), "captions": [text], "json": attrs}
                   for i, (attrs, text) in enumerate(scenes(split, n, seed)))
        summary[split] = write_samples(samples, out, prefix=f"shapes-{split}", shard_size=shard_size)
    return summary


# ---- captions back to attributes ----------------------------------------------------------------

def _alt(words) -> str:
    return "|".join(sorted(map(re.escape, words), key=len, reverse=True))


_ONE = re.compile(rf"(?:there is )?(?:a )?(?P<size>{_alt(SIZES)}) (?P<color>{_alt(COLORS)}) "
                  rf"(?P<shape>{_alt(SHAPES)})(?:, | in the )(?P<place>{_alt(CELLS)})")
_TWO = re.compile(rf"(?:a )?(?P<c1>{_alt(COLORS)}) (?P<s1>{_alt(SHAPES)}) (?P<rel>{_alt(RELATIONS)}) "
                  rf"(?:a )?(?P<c2>{_alt(COLORS)}) (?P<s2>{_alt(SHAPES)})")


def parse_caption(text: str) -> dict:
    """Attributes of any shapes caption: {"objects": [{color, shape, size[, place]}], "relation"}."""
    norm = " ".join(text.lower().replace(".", " ").split())
    if m := _ONE.fullmatch(norm):
        return {"objects": [{k: m[k] for k in ("color", "shape", "size", "place")}], "relation": None}
    if m := _TWO.fullmatch(norm):
        return {"objects": [{"color": m["c1"], "shape": m["s1"], "size": "small"},
                            {"color": m["c2"], "shape": m["s2"], "size": "small"}], "relation": m["rel"]}
    raise ValueError(f"not a shapes caption: {text!r}")


# ---- judging an image against attributes --------------------------------------------------------

COLOR_TOLERANCE = 90.0   # RGB distance within which a pixel counts as a palette colour (or black)
MIN_AREA = 30            # pixels; a smaller blob is noise, not an object (a small triangle has 98)
MIN_PURITY = 0.6         # the named colours must make up this share of all coloured pixels


def _as_uint8(image) -> np.ndarray:
    """PIL image, float tensor/array [3,H,W] or [H,W,3] in [0,1], or uint8 array -> uint8 [64,64,3]."""
    if isinstance(image, Image.Image):
        array = np.asarray(to_rgb(image))
    else:
        array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
        if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
            array = array.transpose(1, 2, 0)
        if array.dtype.kind == "f":
            array = np.clip(array * 255.0 + 0.5, 0, 255)
        array = array.astype(np.uint8)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"image must be RGB [3,H,W] or [H,W,3], got shape {array.shape}")
    if array.shape[:2] != (CANVAS, CANVAS):  # nearest keeps palette colours pure
        array = np.asarray(Image.fromarray(array).resize((CANVAS, CANVAS), Image.Resampling.NEAREST))
    return array


_REFS = np.array([(0, 0, 0)] + list(PALETTE.values()), np.int32)
_REF_CODES = (_REFS[:, 0] << 16) | (_REFS[:, 1] << 8) | _REFS[:, 2]


def _label_colors(array: np.ndarray) -> np.ndarray:
    """int [64, 64]: 0 background, 1 + palette index for palette colours, -1 for neither."""
    rgb = array.astype(np.int32)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    exact = codes[..., None] == _REF_CODES
    labels = np.where(exact.any(-1), exact.argmax(-1), -1)
    off = labels < 0  # only pixels that are not exactly a reference colour need distances
    if off.any():
        d2 = ((rgb[off][:, None, :] - _REFS) ** 2).sum(-1)
        labels[off] = np.where(d2.min(-1) <= COLOR_TOLERANCE ** 2, d2.argmin(-1), -1)
    return labels


def _components(mask: np.ndarray, min_area: int = MIN_AREA) -> list[np.ndarray]:
    """4-connected components of at least min_area pixels, largest first, as bool masks.

    Min-label propagation with pointer jumping, on the mask's bounding box only (fast in numpy).
    """
    if mask.sum() < min_area:
        return []
    ys, xs = np.nonzero(mask)
    y0, x0 = ys.min(), xs.min()
    crop = mask[y0:ys.max() + 1, x0:xs.max() + 1]
    h, w = crop.shape
    n = h * w  # label of background pixels
    lab = np.where(crop, np.arange(n).reshape(h, w), n)
    while True:
        new = lab.copy()
        new[1:] = np.minimum(new[1:], lab[:-1])
        new[:-1] = np.minimum(new[:-1], lab[1:])
        new[:, 1:] = np.minimum(new[:, 1:], lab[:, :-1])
        new[:, :-1] = np.minimum(new[:, :-1], lab[:, 1:])
        new[~crop] = n
        flat = np.append(new.ravel(), n)
        new = np.minimum(new, flat[new])  # a label's own label is in the same component
        if np.array_equal(new, lab):
            break
        lab = new
    ids, counts = np.unique(lab[crop], return_counts=True)
    blobs = []
    for i in ids[np.argsort(-counts, kind="stable")]:
        if (lab == i).sum() < min_area:
            break
        full = np.zeros_like(mask)
        full[y0:y0 + h, x0:x0 + w] = lab == i
        blobs.append(full)
    return blobs


def _measure(blob: np.ndarray) -> dict:
    """Box, fill ratio and vertical mass position of a blob, and the shape/size/cell they imply."""
    ys, xs = np.nonzero(blob)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    w, h = x1 - x0, y1 - y0
    fill = len(xs) / (w * h)
    mass_y = (ys.mean() + 0.5 - y0) / h  # 0.5 for square/circle, ~2/3 for a point-up triangle
    if fill >= 0.88:
        shape = "square"
    elif fill >= 0.66 and abs(mass_y - 0.5) < 0.08:
        shape = "circle"
    elif 0.35 <= fill < 0.66 and mass_y > 0.55:
        shape = "triangle"
    else:
        shape = "other"
    side = max(w, h)
    size = "small" if 8 <= side <= 20 else "large" if 20 < side <= 32 else "other"
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    col, row = (min(2, int(v // (CANVAS / 3))) for v in (cx, cy))
    return {"shape": shape, "size": size, "place": CELLS[row * 3 + col], "center": (cx, cy), "box": (x0, y0, x1, y1)}


def check_image(image, attrs: dict) -> dict:
    """Judge an image against scene attributes (from parse_caption or the shards' json).

    Returns {color, shape, size, place, relation, exact}: relation is None for one object; for two,
    `place` means the objects are separate. Objects are found as the largest blobs of their
    palette colour (pixels within COLOR_TOLERANCE), so noisy or blurred generations still pass.
    """
    labels = _label_colors(_as_uint8(image))
    coloured = int((labels != 0).sum())
    used = np.zeros(labels.shape, bool)
    named = sum(int((labels == 1 + COLORS.index(c)).sum()) for c in {o["color"] for o in attrs["objects"]})
    found, color_ok = [], True
    for obj in attrs["objects"]:
        ci = 1 + COLORS.index(obj["color"])
        blobs = _components((labels == ci) & ~used)
        if not blobs:  # wrong colour: judge the other attributes on the largest blob left
            color_ok = False
            blobs = _components((labels > 0) & ~used)
        if not blobs:
            found.append(None)
            continue
        used |= blobs[0]
        found.append(_measure(blobs[0]))
    color_ok = color_ok and coloured > 0 and named >= MIN_PURITY * coloured
    ok = [m is not None for m in found]
    result = {"color": color_ok and all(ok),
              "shape": all(m is not None and m["shape"] == o["shape"] for m, o in zip(found, attrs["objects"])),
              "size": all(m is not None and m["size"] == o["size"] for m, o in zip(found, attrs["objects"])),
              "relation": None}
    if len(attrs["objects"]) == 1:
        result["place"] = found[0] is not None and found[0]["place"] == attrs["objects"][0].get("place", found[0]["place"])
    else:
        result["place"] = all(ok) and _separate(found[0]["box"], found[1]["box"])
        result["relation"] = all(ok) and bool(_relation_holds(attrs["relation"], found[0]["center"], found[1]["center"]))
    result = {k: None if v is None else bool(v) for k, v in result.items()}
    result["exact"] = all(result[k] for k in ("color", "shape", "size", "place")) and result["relation"] is not False
    return result


def _separate(a, b) -> bool:
    """True if two boxes (x0, y0, x1, y1) neither overlap nor touch."""
    return a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


def _relation_holds(relation: str, c1, c2) -> bool:
    dx, dy = c2[0] - c1[0], c2[1] - c1[1]  # from object 1 to object 2 (y grows downwards)
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along >= 10 and along >= 2 * abs(across)
