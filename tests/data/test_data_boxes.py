from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from anomaly_rl.data.boxes import BoxConfig, boxes_from_mask
from anomaly_rl.data.errors import DataError


def canvas(h: int = 10, w: int = 12) -> np.ndarray:
    return np.zeros((h, w), np.uint8)


def test_single_pixel_box_is_exclusive_at_bottom_right() -> None:
    m = canvas()
    m[4, 7] = 255
    assert boxes_from_mask(m) == [(7.0, 4.0, 8.0, 5.0)]


def test_rectangle_and_l_shape() -> None:
    m = canvas()
    m[1:3, 2:6] = 1  # rows 1-2, cols 2-5
    m[2:8, 5] = 1  # a leg down column 5, touching the bar
    assert boxes_from_mask(m) == [(2.0, 1.0, 6.0, 8.0)]


def test_diagonal_neighbours_are_one_component() -> None:
    m = canvas()
    m[2, 2] = m[3, 3] = m[4, 4] = 1
    assert boxes_from_mask(m) == [(2.0, 2.0, 5.0, 5.0)]


def test_separate_blobs_give_separate_boxes_in_raster_order() -> None:
    m = canvas()
    m[6:8, 1:3] = 1
    m[1:3, 8:11] = 1
    assert boxes_from_mask(m) == [(8.0, 1.0, 11.0, 3.0), (1.0, 6.0, 3.0, 8.0)]


def test_dilation_merges_gaps_up_to_twice_its_size_without_inflating_the_box() -> None:
    m = canvas()
    m[4, 1:3] = 1  # cols 1-2
    m[4, 5:7] = 1  # cols 5-6: a gap of 2 background pixels (3, 4)
    assert len(boxes_from_mask(m, dilation=0)) == 2
    # dilation 1 bridges gaps <= 2: one box, fitted to the original pixels, not the dilated ones.
    assert boxes_from_mask(m, dilation=1) == [(1.0, 4.0, 7.0, 5.0)]
    m2 = canvas()
    m2[4, 1:3] = 1
    m2[4, 6:8] = 1  # gap of 3
    assert len(boxes_from_mask(m2, dilation=1)) == 2
    assert boxes_from_mask(m2, dilation=2) == [(1.0, 4.0, 8.0, 5.0)]


def test_dilation_at_the_border_keeps_boxes_inside_the_image() -> None:
    m = canvas()
    m[0, 0] = 1
    m[9, 11] = 1
    assert sorted(boxes_from_mask(m, dilation=3)) == [(0.0, 0.0, 1.0, 1.0), (11.0, 9.0, 12.0, 10.0)]


def test_min_area_counts_undilated_pixels() -> None:
    m = canvas()
    m[1, 1] = 1  # area 1
    m[5:7, 5:7] = 1  # area 4
    assert boxes_from_mask(m, min_area=2) == [(5.0, 5.0, 7.0, 7.0)]
    # Dilation would make the single pixel 9 pixels large; it must still be dropped.
    assert boxes_from_mask(m, dilation=1, min_area=2) == [(5.0, 5.0, 7.0, 7.0)]
    assert boxes_from_mask(m, min_area=5) == []


def test_grey_level_codes_and_colour_masks() -> None:
    m = canvas()
    m[2:4, 2:4] = 1
    m[6, 9] = 38
    assert len(boxes_from_mask(m)) == 2
    colour = np.zeros((10, 12, 3), np.uint8)
    colour[3, 4, 2] = 200  # only the blue channel is set
    assert boxes_from_mask(colour) == [(4.0, 3.0, 5.0, 4.0)]


def test_empty_mask_has_no_boxes() -> None:
    assert boxes_from_mask(canvas()) == []
    assert boxes_from_mask(canvas(), dilation=3, min_area=1) == []


@pytest.mark.parametrize("bad", [{"dilation": -1}, {"min_area": -2}, {"dilation": 1.5}])
def test_bad_box_settings_name_the_setting(bad: dict) -> None:
    with pytest.raises(DataError, match=next(iter(bad))):
        BoxConfig(**bad)


def test_box_config_from_mapping_rejects_unknown_keys() -> None:
    assert BoxConfig.from_any({"dilation": 2}) == BoxConfig(2, 0)
    with pytest.raises(DataError, match="dilatoin"):
        BoxConfig.from_any({"dilatoin": 2})


def test_non_2d_mask_is_an_error() -> None:
    with pytest.raises(DataError, match="2-D"):
        boxes_from_mask(np.zeros(5))


@settings(max_examples=150, deadline=None)
@given(
    mask=arrays(np.uint8, st.tuples(st.integers(1, 14), st.integers(1, 14)),
                elements=st.sampled_from([0, 0, 0, 1, 255])),
    dilation=st.integers(0, 2),
    min_area=st.integers(0, 4),
)
def test_matches_an_independent_implementation(mask: np.ndarray, dilation: int, min_area: int, ref_boxes) -> None:
    got = boxes_from_mask(mask, dilation=dilation, min_area=min_area)
    assert sorted(got) == ref_boxes(mask, dilation, min_area)
    h, w = mask.shape
    for x1, y1, x2, y2 in got:
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        # Tight: every edge row/column of the box holds a mask pixel.
        inside = mask[int(y1):int(y2), int(x1):int(x2)] > 0
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
    if min_area == 0:
        covered = np.zeros(mask.shape, bool)
        for x1, y1, x2, y2 in got:
            covered[int(y1):int(y2), int(x1):int(x2)] = True
        assert covered[mask > 0].all()
