"""Packing the challenge CSV (fer2013.csv and the icml_face_data.csv variant)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import (CsvSource, assert_nothing_written, class_image, csv_rows, one_line, pixel_string,
                      write_fer_csv)
from pipeline.classes import FER2013_CLASSES, SPLITS
from pipeline.csv_source import parse_pixels
from pipeline.errors import PackError
from pipeline.pack import PackOptions, pack
from pipeline.shards import read_split, verify

SPLIT_OF_USAGE = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}


def run_pack(src, out, **opts):
    return pack(src, out, PackOptions(**opts), workers=1, show_progress=False)


def check_round_trip(source: CsvSource, out):
    """Every row lands in its Usage's split, under id `<file>:<line>`, with its label and exact pixels."""
    expected = {f"{source.path.name}:{k + 2}": row for k, row in enumerate(source.rows)}
    seen = set()
    for split in SPLITS:
        arrays = read_split(out, split, with_ids=True)
        for rid, label, img in zip(arrays.ids, arrays.labels, arrays.images):
            emotion, usage, pixels = expected[rid]
            assert SPLIT_OF_USAGE[usage] == split, rid
            assert label == emotion, rid
            np.testing.assert_array_equal(img, pixels, err_msg=rid)
            seen.add(rid)
    assert seen == set(expected)


@pytest.mark.parametrize("fixture", ["fer_csv", "icml_csv"])
def test_both_header_variants_round_trip(request, tmp_path, fixture):
    source: CsvSource = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    manifest, built = run_pack(source.path, out)
    assert built
    assert manifest["source"]["format"] == "csv"
    assert manifest["classes"] == list(FER2013_CLASSES)
    check_round_trip(source, out)
    for split in SPLITS:
        n = sum(SPLIT_OF_USAGE[u] == split for _, u, _ in source.rows)
        assert manifest["splits"][split]["count"] == n
    assert verify(out) == len(source.rows)


def test_extreme_pixel_values_and_crlf_line_ends(tmp_path):
    rows = csv_rows({"train": 3, "val": 1, "test": 1})
    edge = np.zeros((48, 48), np.uint8)
    edge[::2] = 255
    edge[1::4] = 7
    edge[3::4, ::3] = 100
    rows.append((6, "Training", edge))
    path = write_fer_csv(tmp_path / "fer2013.csv", rows)
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))  # saved on Windows
    run_pack(path, tmp_path / "out")
    check_round_trip(CsvSource(path, rows), tmp_path / "out")


def test_label_indices_are_taken_as_fer2013_order(tmp_path):
    rows = [(k, "Training", class_image(k, f"r{k}")) for k in range(7)]
    path = write_fer_csv(tmp_path / "fer2013.csv", rows)
    manifest, _ = run_pack(path, tmp_path / "out")
    assert manifest["splits"]["train"]["class_counts"] == {c: 1 for c in FER2013_CLASSES}
    train = read_split(tmp_path / "out", "train", with_ids=True)
    for rid, label, img in zip(train.ids, train.labels, train.images):
        line = int(rid.split(":")[1])
        assert label == line - 2
        np.testing.assert_array_equal(img, class_image(line - 2, f"r{line - 2}"))


def _bad_pixels(values: list[str]) -> str:
    ok = ["10"] * 2304
    for k, v in enumerate(values):
        ok[100 + k] = v
    return " ".join(ok)


# (row to insert as the 3rd data row -> line 4, words the message must contain)
BAD_ROWS = {
    "too_few_pixels": ((0, "Training", " ".join(["1"] * 2303)), ["2304", "2303"]),
    "too_many_pixels": ((0, "Training", " ".join(["1"] * 2305)), ["2304", "2305"]),
    "no_pixels": ((0, "Training", ""), ["2304", "found 0"]),
    "non_integer_pixel": ((0, "Training", _bad_pixels(["12.5"])), ["non-integer"]),
    "letter_pixel": ((0, "Training", _bad_pixels(["x"])), ["non-integer", "'x'"]),
    "negative_pixel": ((0, "Training", _bad_pixels(["-3"])), ["non-integer"]),
    "pixel_256": ((0, "Training", _bad_pixels(["256"])), ["out of range", "0..255"]),
    "pixel_1000": ((0, "Training", _bad_pixels(["1000"])), ["out of range"]),
    "label_7": ((7, "Training", _bad_pixels([])), ["label", "'7'", "0..6"]),
    "label_negative": ((-1, "Training", _bad_pixels([])), ["label", "'-1'"]),
    "label_word": (("happy", "Training", _bad_pixels([])), ["label", "'happy'"]),
    "unknown_usage": ((3, "Validation", _bad_pixels([])), ["Usage", "'Validation'", "PublicTest"]),
    "extra_field": ((3, "Training,extra", _bad_pixels([])), ["fields"]),
}


def _with_bad_row(tmp_path, bad_row, variant="fer2013"):
    rows = csv_rows({"train": 5, "val": 2, "test": 2})
    rows.insert(2, bad_row)
    name = "fer2013.csv" if variant == "fer2013" else "icml_face_data.csv"
    return write_fer_csv(tmp_path / name, rows, variant=variant), rows


@pytest.mark.parametrize("variant", ["fer2013", "icml"])
@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_a_bad_row_fails_naming_the_line_and_writes_nothing(tmp_path, case, variant):
    bad_row, needles = BAD_ROWS[case]
    path, _ = _with_bad_row(tmp_path, bad_row, variant)
    out = tmp_path / "out"
    with pytest.raises(PackError) as err:
        run_pack(path, out)
    msg = one_line(str(err.value))
    assert f"{path.name} line 4:" in msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert_nothing_written(out)


def test_the_first_bad_row_is_named_when_there_are_several(tmp_path):
    rows = csv_rows({"train": 6})
    rows[4] = (0, "Training", _bad_pixels(["300"]))
    rows[1] = (9, "Training", _bad_pixels([]))
    path = write_fer_csv(tmp_path / "fer2013.csv", rows)
    with pytest.raises(PackError) as err:
        run_pack(path, tmp_path / "out")
    assert "fer2013.csv line 3:" in str(err.value)


def test_skip_bad_skips_each_bad_row_and_lists_it(tmp_path):
    rows = csv_rows({"train": 10, "val": 4, "test": 4})
    bad_lines = {}
    for k, case in zip((1, 6, 11, 15), ("pixel_256", "non_integer_pixel", "unknown_usage", "too_few_pixels")):
        rows[k] = BAD_ROWS[case][0]
        bad_lines[k + 2] = case
    path = write_fer_csv(tmp_path / "fer2013.csv", rows)
    out = tmp_path / "out"
    manifest, _ = run_pack(path, out, skip_bad=True)
    skipped = {s["source"]: s["error"] for s in manifest["skipped"]}
    assert set(skipped) == {f"fer2013.csv line {line}" for line in bad_lines}
    assert "out of range" in skipped["fer2013.csv line 3"]
    assert "non-integer" in skipped["fer2013.csv line 8"]
    assert "Usage" in skipped["fer2013.csv line 13"]
    good = [(k, r) for k, r in enumerate(rows) if k + 2 not in bad_lines]
    # The good rows keep their own line numbers and pixels.
    expected = {f"fer2013.csv:{k + 2}": r for k, r in good}
    seen = {}
    for split in SPLITS:
        arrays = read_split(out, split, with_ids=True)
        for rid, label, img in zip(arrays.ids, arrays.labels, arrays.images):
            seen[rid] = (split, int(label), img)
    assert set(seen) == set(expected)
    for rid, (emotion, usage, pixels) in expected.items():
        split, label, img = seen[rid]
        assert (split, label) == (SPLIT_OF_USAGE[usage], emotion)
        np.testing.assert_array_equal(img, pixels)
    assert verify(out) == len(good)


@pytest.mark.parametrize("header, missing", [
    ("emotion,Usage", "pixels"),
    ("emotion,pixels", "usage"),
    ("label,pixels,Usage", "emotion"),
    ("", "emotion"),
])
def test_missing_columns_are_refused(tmp_path, header, missing):
    path = tmp_path / "fer2013.csv"
    path.write_text(header + "\n0,1 2 3,Training\n")
    out = tmp_path / "out"
    with pytest.raises(PackError) as err:
        run_pack(path, out)
    msg = one_line(str(err.value))
    assert str(path) in msg and "line 1" in msg and "missing column" in msg and missing in msg
    assert_nothing_written(out)


@pytest.mark.parametrize("content", ["emotion,pixels,Usage\n", "emotion,pixels,Usage\n\n\n"])
def test_csv_without_rows_is_refused(tmp_path, content):
    path = tmp_path / "fer2013.csv"
    path.write_text(content)
    out = tmp_path / "out"
    with pytest.raises(PackError) as err:
        run_pack(path, out)
    assert "no data rows" in one_line(str(err.value))
    assert_nothing_written(out)


def test_csv_is_idempotent_and_notices_changes(fer_csv: CsvSource, tmp_path):
    out = tmp_path / "out"
    _, built = run_pack(fer_csv.path, out)
    assert built
    _, built = run_pack(fer_csv.path, out)
    assert built is False
    rows = fer_csv.rows + [(2, "PrivateTest", class_image(2, "added"))]
    write_fer_csv(fer_csv.path, rows)
    manifest, built = run_pack(fer_csv.path, out)
    assert built and manifest["splits"]["test"]["count"] == 8
    check_round_trip(CsvSource(fer_csv.path, rows), out)


def test_parse_pixels_matches_a_plain_reference():
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (20, 2304)).astype(np.uint8)
    arrays[0] = 0
    arrays[1] = 255
    fields = [pixel_string(a).encode() for a in arrays]
    fields[2] = b"  " + fields[2].replace(b" ", b"   ") + b" "  # extra spaces are still separators
    images, bad = parse_pixels(fields)
    assert bad == {}
    reference = np.array([[int(v) for v in f.split()] for f in fields], np.uint8)
    np.testing.assert_array_equal(images, reference)

    fields[5] = fields[5][:-3] + b"256"
    fields[9] = fields[9] + b" 1"
    fields[13] = b"7;" + fields[13]
    images, bad = parse_pixels(fields)
    assert set(bad) == {5, 9, 13}
    keep = [k for k in range(20) if k not in bad]
    np.testing.assert_array_equal(images[keep], reference[keep])
    assert not images[[5, 9, 13]].any()
