"""FER+ relabelling: the majority-vote rule, and a full pack with --ferplus."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from conftest import USAGE_OF_SPLIT, assert_nothing_written, csv_rows, one_line, write_fer_csv, write_ferplus
from pipeline.classes import FERPLUS_CLASSES, SPLITS
from pipeline.errors import PackError
from pipeline.ferplus import DROP, majority_labels, read_ferplus
from pipeline.pack import PackOptions, pack
from pipeline.shards import read_split, verify

N, H, S, SA, A, D, F, C, U, NF = range(10)  # FER+ vote columns


def votes(**counts) -> list[int]:
    row = [0] * 10
    for name, n in counts.items():
        row[globals()[name]] = n
    return row


# (votes, expected label): each row tests one part of the rule.
RULE = [
    (votes(H=10), H),
    (votes(N=6, H=2, S=2), N),                 # 6 > 10/2
    (votes(N=5, SA=4, A=1), N),                # the single vote is an outlier: 5 > 9/2
    (votes(N=5, SA=4, A=1, D=1, F=1), N),      # several outliers: 5 > 9/2
    (votes(N=5, SA=3, A=2), DROP),             # 5 is not more than half of 10
    (votes(N=4, SA=4, A=2), DROP),             # a tie
    (votes(N=5, SA=5), DROP),                  # a tie
    (votes(H=2, S=2, SA=2, A=2, D=2), DROP),   # no majority at all
    (votes(C=7, N=3), C),                      # contempt is a class
    (votes(F=3, D=2), F),                      # 3 > 5/2
    (votes(F=1), DROP),                        # every vote an outlier
    (votes(N=1, H=1, S=1, SA=1, A=1, D=1, F=1, C=1, U=1, NF=1), DROP),
    (votes(U=8, N=2), DROP),                   # unknown wins: dropped
    (votes(NF=10), DROP),                      # not a face: dropped
    (votes(NF=6, H=4), DROP),
    (votes(H=4, U=3, NF=2), DROP),             # unknown/NF votes count towards the total: 4 is not > 9/2
    (votes(H=6, U=3, NF=1), H),                # NF=1 is an outlier: 6 > 9/2
    ([0] * 10, DROP),
]


def test_majority_rule():
    table = np.array([v for v, _ in RULE], np.int64)
    np.testing.assert_array_equal(majority_labels(table), [label for _, label in RULE])


def test_majority_rule_row_by_row_matches_a_plain_reference():
    """FER+'s own _process_data (majority mode), written out per row."""
    def reference(row):
        row = [0 if v <= 1 else v for v in row]
        total = sum(row)
        top = max(row)
        if top > 0.5 * total:
            k = row.index(top)
            return k if k < 8 else DROP
        return DROP

    rng = np.random.default_rng(0)
    table = np.concatenate([rng.multinomial(10, np.full(10, 0.1), size=300),
                            rng.multinomial(10, [0.4, 0.2, 0.1, 0.1, 0.05, 0.05, 0.04, 0.03, 0.02, 0.01], size=300)])
    got = majority_labels(table)
    assert got.tolist() == [reference(list(r)) for r in table.tolist()]
    assert (got == DROP).any() and (got >= 0).any()


@pytest.fixture
def fer_and_plus(tmp_path):
    """A 21-row fer2013.csv and a fer2013new.csv whose votes cover the rule."""
    rows = csv_rows({"train": 9, "val": 6, "test": 6})
    fer = write_fer_csv(tmp_path / "fer2013.csv", rows)
    plan = []  # (image name, votes, expected FER+ label or DROP)
    for k, (_, usage, _) in enumerate(rows):
        name = f"fer{k:07d}.png"
        if k == 3:
            v, label = votes(N=5, SA=3, A=2), DROP   # no strict majority
        elif k == 4:
            v, label = votes(U=9, H=1), DROP         # unknown
        elif k == 10:
            v, label = votes(NF=10), DROP            # not a face
        elif k == 12:
            v, label, name = votes(H=10), DROP, ""   # FER+ leaves the image out
        elif k == 16:
            v, label = votes(N=4, SA=4, A=2), DROP   # tie
        else:
            label = k % 8
            v = [0] * 10
            v[label] = 5
            v[(label + 1) % 8] = 4
            v[U] = 1  # an outlier vote: without the outlier rule 5 of 10 would not win
        plan.append((usage, name, v, label))
    plus = write_ferplus(tmp_path / "fer2013new.csv", [(u, n, v) for u, n, v, _ in plan])
    return fer, plus, rows, plan


def test_read_ferplus_labels_and_drop_reasons(fer_and_plus):
    fer, plus, rows, plan = fer_and_plus
    labels, drops = read_ferplus(plus, len(rows), [u for _, u, _ in rows])
    assert labels.tolist() == [label for *_, label in plan]
    assert drops == {"empty_image_name": 1, "unknown_or_nf": 4}


def test_pack_with_ferplus(fer_and_plus, tmp_path):
    fer, plus, rows, plan = fer_and_plus
    out = tmp_path / "out"
    manifest, built = pack(fer, out, PackOptions(ferplus=str(plus)), workers=1, show_progress=False)
    assert built
    assert manifest["classes"] == list(FERPLUS_CLASSES) and len(FERPLUS_CLASSES) == 8
    assert manifest["source"]["ferplus_dropped"] == {"empty_image_name": 1, "unknown_or_nf": 4}
    expected = {f"fer2013.csv:{k + 2}": (label, rows[k]) for k, (*_, label) in enumerate(plan) if label != DROP}
    seen = set()
    for split in SPLITS:
        arrays = read_split(out, split, with_ids=True)
        assert arrays.classes == FERPLUS_CLASSES
        for rid, label, img in zip(arrays.ids, arrays.labels, arrays.images):
            want, (_, usage, pixels) = expected[rid]
            assert label == want and USAGE_OF_SPLIT[split] == usage, rid
            np.testing.assert_array_equal(img, pixels)
            seen.add(rid)
        counts = np.bincount(arrays.labels, minlength=8)
        assert manifest["splits"][split]["class_counts"] == dict(zip(FERPLUS_CLASSES, counts.tolist()))
        for shard in manifest["splits"][split]["shards"]:
            with h5py.File(out / shard["file"]) as f:
                assert json.loads(f.attrs["classes"]) == list(FERPLUS_CLASSES)
    assert seen == set(expected)
    assert 7 in {label for label, _ in expected.values()}  # contempt made it through
    assert verify(out) == len(expected)

    # The FER+ file is part of the source: changing it rebuilds.
    _, built = pack(fer, out, PackOptions(ferplus=str(plus)), workers=1, show_progress=False)
    assert built is False
    plus.write_text(plus.read_text().replace("fer0000000.png", "fer0000000.jpg"))
    _, built = pack(fer, out, PackOptions(ferplus=str(plus)), workers=1, show_progress=False)
    assert built


def _rewrite(plus, transform):
    lines = plus.read_text().splitlines()
    plus.write_text("\n".join(transform(lines)) + "\n")


@pytest.mark.parametrize("case, needles", [
    ("fewer_rows", ["20 rows", "21"]),
    ("more_rows", ["22 rows", "21"]),
    ("usage_mismatch", ["line 2", "Usage", "do not match"]),
    ("missing_column", ["line 1", "missing column", "contempt"]),
    ("non_integer_vote", ["line 3", "integer"]),
    ("short_row", ["line 4", "fields"]),
    ("empty_file", ["empty"]),
    ("no_such_file", ["fer2013new.csv"]),
])
def test_bad_ferplus_file_fails_and_writes_nothing(fer_and_plus, tmp_path, case, needles):
    fer, plus, rows, plan = fer_and_plus
    if case == "fewer_rows":
        _rewrite(plus, lambda ls: ls[:-1])
    elif case == "more_rows":
        _rewrite(plus, lambda ls: ls + [ls[-1]])
    elif case == "usage_mismatch":
        _rewrite(plus, lambda ls: [ls[0], ls[1].replace("Training", "PublicTest", 1), *ls[2:]])
    elif case == "missing_column":
        _rewrite(plus, lambda ls: [",".join(c for c in row.split(",")[:9] + row.split(",")[10:]) for row in ls])
    elif case == "non_integer_vote":
        _rewrite(plus, lambda ls: [*ls[:2], ls[2].rsplit(",", 1)[0] + ",x", *ls[3:]])
    elif case == "short_row":
        _rewrite(plus, lambda ls: [*ls[:3], ls[3].rsplit(",", 1)[0], *ls[4:]])
    elif case == "empty_file":
        plus.write_text("")
    elif case == "no_such_file":
        plus.unlink()
    out = tmp_path / "out"
    with pytest.raises(PackError) as err:
        pack(fer, out, PackOptions(ferplus=str(plus)), workers=1, show_progress=False)
    msg = one_line(str(err.value))
    assert str(plus) in msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert_nothing_written(out)


def test_ferplus_needs_the_csv_source(kaggle, tmp_path, fer_and_plus):
    _, plus, _, _ = fer_and_plus
    out = tmp_path / "out"
    with pytest.raises(PackError) as err:
        pack(kaggle.root, out, PackOptions(ferplus=str(plus)), workers=1, show_progress=False)
    assert "--ferplus" in one_line(str(err.value))
    assert_nothing_written(out)


@pytest.mark.parametrize("store", ["raw", "encoded"])
def test_pack_with_ferplus_keeps_the_votes(fer_and_plus, tmp_path, store):
    fer, plus, rows, plan = fer_and_plus
    out = tmp_path / "out"
    manifest, _ = pack(fer, out, PackOptions(ferplus=str(plus), store=store), workers=2, show_progress=False)
    assert manifest["votes"] is True and manifest["class_order"]["source"] == "ferplus"
    expected = {f"fer2013.csv:{k + 2}": (v, label) for k, (_, _, v, label) in enumerate(plan) if label != DROP}
    seen = 0
    for split in SPLITS:
        arrays = read_split(out, split, with_ids=True)
        assert arrays.votes.dtype == np.uint8 and arrays.votes.shape == (len(arrays.labels), 10)
        assert arrays.storage == store
        for rid, label, row in zip(arrays.ids, arrays.labels, arrays.votes):
            want_votes, want_label = expected[rid]
            assert row.tolist() == want_votes and label == want_label == majority_labels(row[None])[0], rid
            seen += 1
        with h5py.File(out / manifest["splits"][split]["shards"][0]["file"]) as f:
            assert f["votes"].shape == (len(arrays.labels), 10)
    assert seen == len(expected)
    assert verify(out) == len(expected)


def test_read_ferplus_votes_are_the_file_counts_and_out_of_range_counts_are_refused(fer_and_plus):
    from pipeline.ferplus import read_ferplus_votes

    fer, plus, rows, plan = fer_and_plus
    labels, drops, table = read_ferplus_votes(plus, len(rows))
    assert table.dtype == np.uint8 and table.tolist() == [v for _, _, v, _ in plan]
    lines = plus.read_text().splitlines()
    plus.write_text("\n".join([*lines[:2], lines[2].rsplit(",", 1)[0] + ",300", *lines[3:]]) + "\n")
    with pytest.raises(PackError) as err:
        read_ferplus_votes(plus, len(rows))
    assert "line 3" in one_line(str(err.value)) and "0..255" in str(err.value)
