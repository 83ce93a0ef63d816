from pathlib import Path

import numpy as np
import pytest

from compressor.data import DataError, load_dataset, read_lists, read_pairs, read_users_dat

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_bundled_citeulike_has_the_papers_exact_counts():
    d = load_dataset("builtin:citeulike-t", min_user_interactions=5)
    assert d.num_users == 5219
    assert d.num_items == 25181
    assert (len(d.train), len(d.valid), len(d.test)) == (98405, 12451, 14724)
    # the bundled copy is the shared data set, byte for byte
    shared = SHARED / "citeulike-t" / "users.dat"
    if shared.exists():
        bundled = Path(__file__).resolve().parents[1] / "compressor" / "datasets" / "citeulike-t" / "users.dat"
        assert bundled.read_bytes() == shared.read_bytes()


def test_split_is_in_file_order_per_user(tmp_path):
    f = tmp_path / "users.dat"
    f.write_text("10 " + " ".join(str(i) for i in range(10)) + "\n5 9 8 7 6 5\n")
    d = load_dataset(str(f), fmt="users_dat")
    u0 = int(np.flatnonzero(d.user_ids == "0")[0])
    ext = lambda split: [d.item_ids[i] for u, i in zip(split.users, split.items) if u == u0]  # noqa: E731
    assert ext(d.train) == [str(i) for i in range(8)]
    assert ext(d.valid) == ["8"]
    assert ext(d.test) == ["9"]


def test_split_random_is_seeded_and_deterministic(tmp_path):
    f = tmp_path / "pairs.csv"
    rows = [f"u{u},i{(u * 7 + j) % 50}" for u in range(30) for j in range(20)]
    f.write_text("\n".join(rows))
    a = load_dataset(str(f), split_order="random", seed=3)
    b = load_dataset(str(f), split_order="random", seed=3)
    c = load_dataset(str(f), split_order="random", seed=4)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    assert (a.test.items == b.test.items).all()


def test_timestamp_split_orders_by_time(tmp_path):
    f = tmp_path / "log.tsv"
    # user a: items given out of time order; the latest two must be valid/test
    lines = ["user\titem\ttimestamp"] + [f"a\tx{i}\t{100 - i}" for i in range(10)]
    f.write_text("\n".join(lines))
    d = load_dataset(str(f), split_order="timestamp")
    assert [d.item_ids[i] for i in d.test.items] == ["x0"]
    assert [d.item_ids[i] for i in d.valid.items] == ["x1"]


def test_pairs_reader_formats(tmp_path):
    (tmp_path / "a.csv").write_text("user_id,item_id\nalice,apple\nbob,pear\n")
    (tmp_path / "b.tsv").write_text("alice\tapple\t1.5\nbob\tpear\t2\n")
    (tmp_path / "c.txt").write_text("alice apple\nbob pear\n")
    for name in ("a.csv", "b.tsv", "c.txt"):
        recs = read_pairs(tmp_path / name)
        assert [(r[0], r[1]) for r in recs] == [("alice", "apple"), ("bob", "pear")], name
    assert read_pairs(tmp_path / "b.tsv")[0][2] == 1.5


def test_lists_reader_and_directory_dataset(tmp_path):
    (tmp_path / "train.txt").write_text("0 1 2 3\n1 2 3 4\n2 1 4\n")
    (tmp_path / "valid.txt").write_text("0 4\n1 1\n")
    (tmp_path / "test.txt").write_text("0 9\n7 1\n2 3\n")  # item 9 and user 7 were never seen in training
    assert len(read_lists(tmp_path / "train.txt")) == 8
    d = load_dataset(str(tmp_path))
    assert d.num_users == 3 and d.num_items == 4
    assert len(d.test) == 1  # only (2, 3) survives
    assert d.dropped["test"] == {"unknown_users": 1, "unknown_items": 1}


def test_gowalla_directory_loads():
    if not (SHARED / "gowalla").exists():
        pytest.skip("shared data not present")
    d = load_dataset(str(SHARED / "gowalla"))
    assert d.num_users == 29858
    assert len(d.train) + len(d.valid) + len(d.test) + 25 == 1027370  # 25 held-out rows name unseen items


def test_kcore_filter(tmp_path):
    f = tmp_path / "p.csv"
    rows = [f"u{u},i{i}" for u in range(5) for i in range(5)] + ["lonely,i0", "u0,rare"]
    f.write_text("\n".join(rows))
    d = load_dataset(str(f), min_user_interactions=2, min_item_interactions=2)
    assert "lonely" not in d.user_ids and "rare" not in d.item_ids


@pytest.mark.parametrize("content,fmt,msg", [
    ("3 1 2\n", "users_dat", ":1: count says 3 items but the line has 2"),
    ("2 1 2\n-1\n", "users_dat", ":2: negative count -1"),
    ("2 1 2\nx 1\n", "users_dat", ":2: count 'x' is not an integer"),
    ("a,b\nc,d,e,f\n", "pairs", ":2: expected"),
    ("a,b,1\nc,d,yesterday\n", "pairs", ":2: timestamp 'yesterday' is not a number"),
])
def test_bad_input_names_file_and_line(tmp_path, content, fmt, msg):
    f = tmp_path / "bad.txt"
    f.write_text(content)
    with pytest.raises(DataError) as e:
        load_dataset(str(f), fmt=fmt)
    assert str(f) in str(e.value) and msg in str(e.value)


def test_unreadable_and_empty_inputs(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_dataset(str(tmp_path / "missing.csv"))
    (tmp_path / "bin.dat").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="not a UTF-8 text file"):
        load_dataset(str(tmp_path / "bin.dat"), fmt="pairs")
    (tmp_path / "small.csv").write_text("a,x\nb,y\n")
    with pytest.raises(DataError, match="no interactions left after filtering"):
        load_dataset(str(tmp_path / "small.csv"), min_user_interactions=5)
    with pytest.raises(DataError, match="unknown built-in"):
        load_dataset("builtin:nope")


def test_users_dat_reader_maps_line_numbers_to_users(tmp_path):
    f = tmp_path / "users.dat"
    f.write_text("2 5 6\n1 7\n")
    recs = read_users_dat(f)
    assert [(r[0], r[1]) for r in recs] == [("0", "5"), ("0", "6"), ("1", "7")]
