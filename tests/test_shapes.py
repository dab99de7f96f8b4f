"""The built-in shapes set against its spec (shared/specs/shapes.md), and the pixel checker."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_ar.cli import main as cli_main
from dalle_ar.data import iter_raw_samples, shapes
from dalle_ar.data.shapes import HELD_OUT, PALETTE, check_image, parse_caption, render, val_captions


@pytest.fixture(scope="module")
def shape_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    summary = shapes.generate_shapes(out, train_size=600, val_size=200, shard_size=250, seed=3)
    assert summary["train"]["written"] == 600 and summary["train"]["shards"] == 3
    assert summary["val"]["files"] == ["shapes-val-000000.tar"]
    return out, {split: list(iter_raw_samples(str(out / f"shapes-{split}-*.tar"))) for split in ("train", "val")}


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def test_same_seed_same_bytes(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        shapes.generate_shapes(tmp_path / name, train_size=60, val_size=20, shard_size=25, seed=seed)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    assert len(digest(tmp_path / "a")) == 4


def test_every_image_obeys_the_spec(shape_set):
    out, splits = shape_set
    allowed = {0} | {r << 16 | g << 8 | b for r, g, b in PALETTE.values()}
    n_pairs = 0
    for sample in splits["train"] + splits["val"]:
        attrs, (text,) = sample["json"], sample["captions"]
        image = np.asarray(sample["image"])
        assert image.shape == (64, 64, 3)
        rgb = image.astype(np.int64)
        assert set(np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]).tolist()) <= allowed  # no anti-aliasing
        assert check_image(image, attrs)["exact"] and check_image(sample["image"], parse_caption(text))["exact"]
        objs = attrs["objects"]
        for o in objs:
            half = o["box"] // 2
            cx, cy = o["center"]
            assert o["box"] == {"small": 14, "large": 26}[o["size"]] and half <= cx <= 64 - half and half <= cy <= 64 - half
            assert tuple(image[cy, cx - 1]) == PALETTE[o["color"]]  # the pixel left of the centre is inside every shape
            assert tuple(image[cy - half, cx - half]) == (PALETTE[o["color"]] if o["shape"] == "square" else (0, 0, 0))
        if len(objs) == 1:
            o = objs[0]
            cell = shapes.CELLS.index(o["place"])
            want = (shapes.CELL_CENTRES[cell % 3], shapes.CELL_CENTRES[cell // 3])
            assert all(abs(c - w) <= 3 or c in (o["box"] // 2, 64 - o["box"] // 2) for c, w in zip(o["center"], want))
        else:
            n_pairs += 1
            a, b = objs
            assert a["color"] != b["color"] and a["size"] == b["size"] == "small"
            along, across = (0, 1) if attrs["relation"] in ("left of", "right of") else (1, 0)
            sign = 1 if attrs["relation"] in ("left of", "above") else -1
            assert sign * (b["center"][along] - a["center"][along]) >= 22
            assert abs(b["center"][across] - a["center"][across]) <= 6
    assert 0.15 < n_pairs / 800 < 0.35
    # the triangle points up and fills half its box; the circle is the inscribed disc
    tri = shapes.shape_mask("triangle", 26, 32, 32)
    assert tri[44].sum() == 26 and tri[19].sum() == 0 and tri[20].sum() == 2 and tri.sum() == pytest.approx(26 * 26 / 2, rel=0.03)
    disc = shapes.shape_mask("circle", 26, 32, 32)
    assert disc.sum() == pytest.approx(np.pi * 13 ** 2, rel=0.03) and not disc[19, 19] and disc[32, 19]
    with open(out / "shapes-val-000000.tar", "rb") as f:
        assert b".png" in f.read(2048)  # lossless PNG, not JPEG


def test_held_out_pairs(shape_set):
    _, splits = shape_set

    def pairs(samples):
        return {(o["color"], o["shape"]) for s in samples for o in s["json"]["objects"]}

    assert not pairs(splits["train"]) & set(HELD_OUT)
    assert set(HELD_OUT) <= pairs(splits["val"])
    assert set(HELD_OUT) <= {(o["color"], o["shape"]) for c in val_captions(5) for o in parse_caption(c)["objects"]}


def test_captions_parse_and_val_captions_are_canonical():
    for attrs, text in shapes.scenes("train", 200, seed=0):
        parsed = parse_caption(text)
        assert [(o["color"], o["shape"], o["size"]) for o in parsed["objects"]] == \
               [(o["color"], o["shape"], o["size"]) for o in attrs["objects"]]
        assert parsed["relation"] == attrs.get("relation")
    assert parse_caption("There is a LARGE red circle in the center.")["objects"][0]["place"] == "center"
    caps = val_captions(40, seed=0)
    assert caps == val_captions(40, seed=0) != val_captions(40, seed=1)
    assert caps == [shapes.caption(a) for a, _ in shapes.scenes("val", 40, seed=0)]
    assert all(c.startswith("a ") for c in caps)
    with pytest.raises(ValueError, match="not a shapes caption"):
        parse_caption("a large pink hexagon in the sky")


def _perturbed(attrs, what):
    attrs = json.loads(json.dumps(attrs))
    o = attrs["objects"][0]
    if what == "color":
        o["color"] = next(c for c in PALETTE if c not in {x["color"] for x in attrs["objects"]})
    elif what == "shape":
        o["shape"] = {"square": "circle", "circle": "triangle", "triangle": "square"}[o["shape"]]
    elif what == "size":
        o["size"], o["box"] = ("large", 26) if o["size"] == "small" else ("small", 14)
        o["center"] = [int(np.clip(c, o["box"] // 2, 64 - o["box"] // 2)) for c in o["center"]]
    elif what == "place":
        o["center"] = [64 - o["center"][0], 64 - o["center"][1]] if o["place"] != "center" else [11, 11]
    elif what == "relation":
        a, b = attrs["objects"]
        a["center"], b["center"] = b["center"], a["center"]
    return attrs


@pytest.mark.parametrize("what", ["color", "shape", "size", "place", "relation"])
def test_checker_rejects_wrong_attributes(what):
    singles = [a for a, _ in shapes.scenes("val", 300, seed=5) if len(a["objects"]) == 1]
    pairs = [a for a, _ in shapes.scenes("val", 300, seed=5) if len(a["objects"]) == 2]
    cases = (pairs if what == "relation" else singles)[:40]
    for attrs in cases:
        result = check_image(render(_perturbed(attrs, what)), attrs)
        assert result[what] is False and not result["exact"], (what, attrs, result)


def test_checker_is_robust_and_takes_any_image_type():
    rng = np.random.default_rng(0)
    scenes = [a for a, _ in shapes.scenes("train", 60, seed=7)]
    for attrs in scenes:
        image = render(attrs)
        noisy = np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)
        assert check_image(noisy, attrs)["exact"]
        assert check_image(torch.from_numpy(image).permute(2, 0, 1) / 255.0, attrs)["exact"]
        assert check_image(Image.fromarray(image).resize((128, 128), Image.NEAREST), attrs)["exact"]
    blank = check_image(np.zeros((64, 64, 3), np.uint8), scenes[0])
    assert not any(blank[k] for k in ("color", "shape", "size", "place", "exact"))


def test_cli_shapes(tmp_path, capsys):
    assert cli_main(["data", "shapes", "--out", str(tmp_path), "--train-size", "30", "--val-size", "10",
                     "--shard-size", "10", "--seed", "4"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["train"]["shards"] == 3 and summary["val"]["written"] == 10
    assert json.loads(capsys.readouterr().out) == summary
