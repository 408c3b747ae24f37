"""RLE: round trips, the organisers' reference semantics, challenge-format CSVs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainer import rle


def reference_mask2rle(img: np.ndarray, width: int, height: int) -> str:
    """Port of the organisers' mask_functions.mask2rle (called as mask2rle(mask.T * 255))."""
    out: list[str] = []
    last_color, current_pixel, run_start, run_length = 0, 0, -1, 0
    for x in range(width):
        for y in range(height):
            current_color = img[x][y]
            if current_color != last_color:
                if current_color == 255:
                    run_start, run_length = current_pixel, 1
                else:
                    out += [str(run_start), str(run_length)]
                    run_start, run_length, current_pixel = -1, 0, 0
            elif run_start > -1:
                run_length += 1
            last_color = current_color
            current_pixel += 1
    return " ".join(out)


def reference_rle2mask(text: str, width: int, height: int) -> np.ndarray:
    """Port of the organisers' rle2mask (the caller transposes the result)."""
    mask = np.zeros(width * height)
    values = np.asarray([int(x) for x in text.split()])
    position = 0
    for start, length in zip(values[0::2], values[1::2], strict=True):
        position += start
        mask[position : position + length] = 255
        position += length
    return mask.reshape(width, height)


def random_mask(rng: np.random.Generator, shape: tuple[int, int], density: float) -> np.ndarray:
    return rng.random(shape) < density


@pytest.mark.parametrize("shape", [(16, 16), (24, 40), (7, 3)])
@pytest.mark.parametrize("encoding", ["relative", "absolute"])
def test_round_trip_random_masks(shape: tuple[int, int], encoding: str) -> None:
    rng = np.random.default_rng(0)
    for density in (0.0, 0.05, 0.5, 0.95, 1.0):
        mask = random_mask(rng, shape, density)
        text = rle.encode(mask, encoding=encoding)
        decoded = rle.decode(text, shape, encoding=encoding)
        assert decoded.dtype == bool and decoded.shape == shape
        np.testing.assert_array_equal(decoded, mask)
    assert rle.encode(np.zeros(shape, bool)) == "-1"


def test_matches_organisers_reference_encoder_and_decoder() -> None:
    rng = np.random.default_rng(1)
    height = width = 32
    for _ in range(20):
        mask = random_mask(rng, (height, width), rng.uniform(0.05, 0.6))
        mask[-1, -1] = False  # the reference drops a run that touches the last pixel
        ours = rle.encode(mask)
        reference = reference_mask2rle((mask.T * 255).astype(np.uint8), width, height)
        assert ours == reference
        np.testing.assert_array_equal(reference_rle2mask(ours, width, height).T > 0, mask)


def test_run_touching_last_pixel_is_kept() -> None:
    mask = np.zeros((4, 4), bool)
    mask[2:, 3] = True  # column-major: the last two flat pixels
    assert rle.encode(mask) == "14 2"
    np.testing.assert_array_equal(rle.decode("14 2", (4, 4)), mask)


def test_column_major_order() -> None:
    mask = np.zeros((4, 5), bool)
    mask[1, 0] = True  # flat index 1 walking down columns
    mask[0, 1] = True  # flat index 4 (= 1 * rows)
    assert rle.encode(mask, encoding="absolute") == "1 1 4 1"
    assert rle.encode(mask) == "1 1 2 1"  # relative: 4 - end of previous run (2)


def test_decode_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="even number"):
        rle.decode("1 2 3", (4, 4))
    with pytest.raises(ValueError, match="outside"):
        rle.decode("10 10", (4, 4))
    with pytest.raises(ValueError, match="positive"):
        rle.decode("1 0", (4, 4))


def write_challenge_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    lines = ["ImageId, EncodedPixels"] + [f"{image_id}, {text}" for image_id, text in rows]
    path.write_text("\n".join(lines) + "\n")


def test_read_challenge_csv_with_multi_row_images_and_empty_rows(tmp_path: Path) -> None:
    shape = (32, 32)
    rng = np.random.default_rng(2)
    first = np.zeros(shape, bool)
    first[3:9, 4:10] = True
    second = np.zeros(shape, bool)
    second[20:30, 15:25] = True
    single = random_mask(rng, shape, 0.2)
    write_challenge_csv(
        tmp_path / "train-rle.csv",
        [
            ("1.2.3.1", rle.encode(first)),
            ("1.2.3.2", "-1"),
            ("1.2.3.1", rle.encode(second)),
            ("1.2.3.3", rle.encode(single)),
        ],
    )
    table = rle.read_rle_csv(tmp_path / "train-rle.csv", shape=shape)
    assert table.encoding is rle.RleEncoding.RELATIVE
    assert table.image_ids == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
    assert len(table.rows["1.2.3.1"]) == 2
    np.testing.assert_array_equal(table.mask("1.2.3.1"), first | second)
    assert not table.mask("1.2.3.2").any()
    assert table.is_positive("1.2.3.1") and not table.is_positive("1.2.3.2")
    np.testing.assert_array_equal(table.mask("1.2.3.3"), single)


def test_read_stage2_absolute_csv_detected(tmp_path: Path) -> None:
    shape = (32, 32)
    mask = np.zeros(shape, bool)
    mask[5:12, 8:20] = True
    path = tmp_path / "stage_2_train.csv"
    path.write_text(
        "ImageId,EncodedPixels\n"
        f"a,{rle.encode(mask, encoding='absolute')}\n"
        "b,-1\n"
    )
    table = rle.read_rle_csv(path, shape=shape)
    assert table.encoding is rle.RleEncoding.ABSOLUTE
    np.testing.assert_array_equal(table.mask("a"), mask)
    assert not table.is_positive("b")


def test_write_then_read_rle_csv(tmp_path: Path) -> None:
    shape = (16, 16)
    rng = np.random.default_rng(3)
    masks = {f"id{i}": random_mask(rng, shape, 0.3) for i in range(3)}
    masks["empty"] = np.zeros(shape, bool)
    path = rle.write_rle_csv(tmp_path / "train-rle.csv", masks)
    assert path.read_text().splitlines()[0] == "ImageId, EncodedPixels"
    table = rle.read_rle_csv(path, shape=shape, encoding="relative")
    for image_id, mask in masks.items():
        np.testing.assert_array_equal(table.mask(image_id), mask)


def test_read_rejects_wrong_header(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("id,pixels\nx,-1\n")
    with pytest.raises(ValueError, match="lacks ImageId"):
        rle.read_rle_csv(path)


def test_absolute_start_convention_is_a_setting(tmp_path) -> None:
    from trainer import data

    mask = np.zeros((4, 4), bool)
    mask[1:3, 2] = True  # column-major pixels 9 and 10
    assert rle.decode("9 2", (4, 4), encoding="absolute").tolist() == mask.tolist()
    assert rle.decode("10 2", (4, 4), encoding="absolute", absolute_start=1).tolist() == mask.tolist()
    with pytest.raises(ValueError, match="absolute_start must be 0 or 1"):
        rle.decode("9 2", (4, 4), encoding="absolute", absolute_start=2)
    import os

    os.environ[data.RLE_ABSOLUTE_START_ENV] = "2"
    try:
        with pytest.raises(ValueError, match="must be 0 or 1"):
            data._rle_absolute_start()
    finally:
        del os.environ[data.RLE_ABSOLUTE_START_ENV]
    assert data._rle_absolute_start() == 0
