"""bench/quality.py's evaluation prompts: canonical validation captions with enough two-object and
held-out-pair scenes to measure them (issue 19)."""

import importlib.util
import sys
from pathlib import Path

from dalle_ar.data import shapes

BENCH = Path(__file__).parents[1] / "bench"
sys.path.append(str(BENCH))  # the bench scripts import their `common` module; appended, so nothing in
# bench/ can shadow an installed package for the rest of the test session
_spec = importlib.util.spec_from_file_location("bench_quality", BENCH / "quality.py")
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def test_evaluation_captions_hold_two_object_and_held_out_scenes_of_both_kinds():
    captions = quality.evaluation_captions(128, seed=0)
    assert captions == quality.evaluation_captions(128, seed=0)  # deterministic
    attrs = [shapes.parse_caption(c) for c in captions]
    assert [shapes.caption(a_) for a_ in attrs] == captions  # canonical form (template 0)
    kinds = quality.scene_kinds(attrs)
    one, two, held = (set(kinds[k]) for k in ("one_object_exact", "two_object_exact", "held_out_exact"))
    assert len(captions) == 128 and len(two) >= 32 and len(one) + len(two) == 128
    assert len(held & one) >= 24 and len(held & two) >= 8  # a quarter of each kind
    val = {c for _, c in shapes.scenes("val", 128 * 200, 0)} | set(shapes.val_captions(128 * 200, 0))
    assert set(captions) <= val  # drawn from the validation stream
    small = quality.evaluation_captions(10, seed=3)
    assert len(small) == 10 and all(len(shapes.parse_caption(c)["objects"]) == 2 for c in small)
