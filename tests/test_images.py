"""The captioned sheet (dalle_ar.images.image_sheet) that `dalle-ar generate` and the demo write."""

import numpy as np
import pytest
from PIL import Image

from dalle_ar.images import BACKGROUND, FAIL, PASS, SheetRow, image_sheet

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def solid(colour, size=64):
    return Image.new("RGB", (size, size), colour)


def count(sheet, colour) -> int:
    return int((np.asarray(sheet) == np.array(colour, np.uint8)).all(-1).sum())


def test_every_image_is_drawn_upscaled_nearest_best_first_and_capped():
    rows = [SheetRow(f"prompt {i}", [solid(c) for c in COLOURS[2 * i:2 * i + 2]] + [solid((9, 9, 9))],
                     labels=["#1", "#2", "#3"]) for i in range(3)]
    sheet = image_sheet(rows, scale=2, max_images=2)
    for c in COLOURS:  # each image once, at 128 x 128 (NEAREST keeps every pixel pure)
        assert count(sheet, c) == 128 * 128, c
    assert count(sheet, (9, 9, 9)) == 0  # the third image of each row is past max_images
    a = np.asarray(sheet)
    ys, xs = np.nonzero((a == np.array(COLOURS[0], np.uint8)).all(-1))
    ys2, xs2 = np.nonzero((a == np.array(COLOURS[1], np.uint8)).all(-1))
    assert ys.min() == ys2.min() and xs.max() < xs2.min()  # a prompt's images side by side, in order


def test_captions_and_labels_are_drawn_under_the_images():
    img = solid((200, 30, 30))
    with_text = np.asarray(image_sheet([SheetRow("a large red square in the center", [img, img], ["#1 1.00", "#2 0.50"])]))
    without = np.asarray(image_sheet([SheetRow(" ", [img, img], ["", ""])]))
    assert with_text.shape == without.shape
    ys, _ = np.nonzero((with_text == np.array((200, 30, 30), np.uint8)).all(-1))
    strip_with, strip_without = with_text[ys.max() + 1:], without[ys.max() + 1:]
    ink = lambda s: int((np.abs(s.astype(int) - np.array(BACKGROUND)).sum(-1) > 150).sum())  # noqa: E731
    assert ink(strip_without) == 0
    assert ink(strip_with) > 200  # caption and scores: dark text in the strip under the images


def test_size_is_bounded_and_left_out_prompts_counted():
    rows = [SheetRow(f"prompt {i}", [solid(COLOURS[i % 6])] * 16, [f"{j}" for j in range(16)]) for i in range(60)]
    sheet = image_sheet(rows, scale=2, max_images=4, width=1200, max_height=1500)
    assert sheet.size[0] <= 1200 and sheet.size[1] <= 1500
    shown = sum(count(sheet, c) for c in COLOURS) // (128 * 128 * 4)
    assert 2 <= shown < 60
    assert sheet.size[0] > 2 * 4 * 128  # at least two prompts side by side within the width


def test_marks_frame_images_green_or_red():
    img = solid((30, 30, 200))
    sheet = image_sheet([SheetRow("x", [img, img, img], marks=[True, False, None])])
    assert count(sheet, PASS) > 4 * 128 and count(sheet, FAIL) > 4 * 128
    plain = image_sheet([SheetRow("x", [img, img, img])])
    assert count(plain, PASS) == count(plain, FAIL) == 0


@pytest.mark.parametrize("kwargs", [{"scale": 0}, {"max_images": 0}, {"width": -5}, {"max_height": 2.5}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        image_sheet([SheetRow("x", [solid((1, 2, 3))])], **kwargs)
    with pytest.raises(ValueError, match="no row"):
        image_sheet([SheetRow("x", [])])
