"""Tests for cleannet_tf.data: feature-set format, TSV reader and datasets."""

import os

import numpy as np
import pytest

from cleannet_tf import data
from cleannet_tf.errors import InputError

CLASSES = ["cat", "dog", "fox"]
DIM = 4


def _rows(n=11, seed=0):
  rng = np.random.default_rng(seed)
  keys = np.array([f"img{i:03d}" for i in range(n)])
  features = rng.normal(size=(n, DIM)).astype(np.float32)
  class_ids = rng.integers(0, len(CLASSES), size=n)
  verification = np.array([-1, 0, 1, -1, -1, 1, -1, 0, -1, -1, 1][:n])
  return keys, features, class_ids, verification


def _tsv_line(key, name, label, values):
  return f"{key}\t{name}\t{label}\t{','.join(str(v) for v in values)}\n"


def _write_tsv(path, lines):
  path.write_text("".join(lines), encoding="utf-8")
  return path


def _good_lines(n=6):
  return [_tsv_line(f"k{i}", CLASSES[i % 3], (-1, 0, 1)[i % 3],
                    [i + 0.5] * DIM) for i in range(n)]


def _files(directory):
  return sorted(os.listdir(directory))


def test_round_trip_two_shards(tmp_path):
  keys, features, class_ids, verification = _rows()
  info = data.write_features(tmp_path / "fs", keys, features, class_ids,
                             verification, CLASSES, rows_per_shard=6)
  assert _files(tmp_path / "fs") == [
      "classes.txt", "features-00000.tfrecord", "features-00001.tfrecord",
      "metadata.json"]

  info = data.read_info(tmp_path / "fs")
  assert (info.dim, info.num_classes, info.num_rows) == (DIM, 3, 11)
  assert info.class_names == tuple(CLASSES)
  assert info.shard_num_rows == (6, 5)
  expected_counts = np.zeros((3, 3), dtype=np.int64)
  np.add.at(expected_counts, (class_ids, verification + 1), 1)
  np.testing.assert_array_equal(info.class_counts, expected_counts)
  assert info.num_verified == int((verification >= 0).sum())

  rows = list(data.feature_dataset(info, with_source=True).as_numpy_iterator())
  assert [r["key"].decode() for r in rows] == keys.tolist()
  np.testing.assert_array_equal(np.stack([r["features"] for r in rows]),
                                features)
  np.testing.assert_array_equal([r["class_id"] for r in rows], class_ids)
  np.testing.assert_array_equal([r["verification"] for r in rows],
                                verification)
  assert [r["row"] for r in rows] == list(range(6)) + list(range(5))
  assert [os.path.basename(r["source"].decode()) for r in rows] == (
      ["features-00000.tfrecord"] * 6 + ["features-00001.tfrecord"] * 5)

  for which, selected in (("all", np.ones(11, dtype=bool)),
                          ("verified", verification >= 0),
                          ("unverified", verification < 0)):
    arrays = data.load_arrays(info, which, batch_size=4)
    assert arrays["key"].tolist() == [k.encode() for k in keys[selected]]
    np.testing.assert_array_equal(arrays["features"], features[selected])
    np.testing.assert_array_equal(arrays["class_id"], class_ids[selected])
    np.testing.assert_array_equal(arrays["verification"],
                                  verification[selected])
    streamed = list(data.feature_dataset(info, which).as_numpy_iterator())
    assert [r["key"].decode() for r in streamed] == keys[selected].tolist()


def test_order_kept_over_many_uneven_shards(tmp_path):
  keys, features, class_ids, verification = _rows()
  with data.FeatureWriter(tmp_path, DIM, CLASSES, rows_per_shard=2) as writer:
    # Chunks that straddle shard boundaries.
    for start, stop in ((0, 2), (2, 7), (7, 11)):
      writer.write(keys[start:stop], features[start:stop],
                   class_ids[start:stop], verification[start:stop],
                   first_row=start + 1)
  info = data.read_info(tmp_path)
  assert info.shard_num_rows == (2, 2, 2, 2, 2, 1)
  arrays = data.load_arrays(info, "all", batch_size=2)
  assert arrays["key"].tolist() == [k.encode() for k in keys]
  # Without shard sizes (an info built by hand) shards are read in turn.
  by_hand = data.FeatureSetInfo(
      directory=info.directory, dim=info.dim, class_names=info.class_names,
      num_rows=0, shard_paths=info.shard_paths, class_counts=info.class_counts)
  arrays = data.load_arrays(by_hand, "all", batch_size=2)
  assert arrays["key"].tolist() == [k.encode() for k in keys]


def test_load_arrays_with_no_selected_rows(tmp_path):
  keys, features, class_ids, _ = _rows()
  info = data.write_features(tmp_path, keys, features, class_ids,
                             np.full(11, -1), CLASSES)
  arrays = data.load_arrays(info)
  assert arrays["features"].shape == (0, DIM)
  assert arrays["key"].shape == (0,)


@pytest.mark.parametrize("column, row, value, message", [
    ("features", 3, [0, 0, np.nan, 0], "<arrays>:4: feature 2 is nan"),
    ("features", 3, [0, 0, 0, 1e39], "<arrays>:4: feature 3 is inf"),
    ("class_ids", 5, 3, "<arrays>:6: class id 3 outside [0, 3)"),
    ("verification", 7, 2, "<arrays>:8: verification 2 not in"),
    ("keys", 9, "", "<arrays>:10: empty key"),
])
def test_writer_names_first_bad_row(tmp_path, column, row, value, message):
  arrays = dict(zip(("keys", "features", "class_ids", "verification"),
                    _rows()))
  arrays["features"] = arrays["features"].astype(np.float64)
  arrays[column][row] = value
  with pytest.raises(InputError) as e:
    with data.FeatureWriter(tmp_path, DIM, CLASSES) as writer:
      writer.write(**arrays)
  assert str(e.value).startswith(message)
  assert "\n" not in str(e.value)
  assert not os.listdir(tmp_path)


def test_writer_checks_width(tmp_path):
  keys, _, class_ids, verification = _rows()
  with pytest.raises(InputError, match="^src:7: feature width 5, expected 4$"):
    with data.FeatureWriter(tmp_path, DIM, CLASSES) as writer:
      writer.write(keys, np.ones((11, DIM + 1)), class_ids, verification,
                   source="src", first_row=7)


def test_writer_exception_leaves_no_metadata_or_temp_files(tmp_path):
  keys, features, class_ids, verification = _rows()
  with pytest.raises(RuntimeError):
    with data.FeatureWriter(tmp_path, DIM, CLASSES, rows_per_shard=4) as w:
      w.write(keys, features, class_ids, verification)
      raise RuntimeError("interrupted")
  assert os.listdir(tmp_path) == []
  with pytest.raises(InputError, match="not a feature set"):
    data.read_info(tmp_path)


def test_writer_without_rows_fails(tmp_path):
  with pytest.raises(InputError, match="<arrays>: no rows"):
    with data.FeatureWriter(tmp_path, DIM, CLASSES) as writer:
      writer.close()
  assert os.listdir(tmp_path) == []


def test_read_info_errors(tmp_path):
  with pytest.raises(InputError) as e:
    data.read_info(tmp_path)
  assert str(tmp_path) in str(e.value)
  assert "write did not finish" in str(e.value)

  keys, features, class_ids, verification = _rows()
  data.write_features(tmp_path, keys, features, class_ids, verification,
                      CLASSES, rows_per_shard=6)
  os.remove(tmp_path / "features-00001.tfrecord")
  with pytest.raises(InputError, match="features-00001.tfrecord .* missing"):
    data.read_info(tmp_path)

  (tmp_path / "metadata.json").write_text("{not json")
  with pytest.raises(InputError, match="metadata.json: malformed"):
    data.read_info(tmp_path)


def test_class_names(tmp_path):
  path = tmp_path / "classes.txt"
  data.write_class_names(path, CLASSES)
  assert data.read_class_names(path) == CLASSES
  path.write_text("cat\ndog\ncat\n")
  with pytest.raises(InputError, match=r"classes.txt:3: duplicate .*line 1"):
    data.read_class_names(path)
  path.write_text("cat\n\ndog\n")
  with pytest.raises(InputError, match=r"classes.txt:2: blank"):
    data.read_class_names(path)
  path.write_text("")
  with pytest.raises(InputError, match="classes.txt: empty"):
    data.read_class_names(path)
  with pytest.raises(InputError, match="missing.txt"):
    data.read_class_names(tmp_path / "missing.txt")


def test_convert_tsv(tmp_path):
  lines = _good_lines(7)
  lines[2] = lines[2].replace("\n", "\r\n")  # Windows line ends are fine.
  tsv = _write_tsv(tmp_path / "train.tsv", lines)
  info = data.convert_tsv([tsv], CLASSES, tmp_path / "fs", rows_per_shard=3)
  assert info.num_rows == 7 and len(info.shard_paths) == 3
  arrays = data.load_arrays(info, "all")
  assert arrays["key"].tolist() == [f"k{i}".encode() for i in range(7)]
  np.testing.assert_array_equal(arrays["features"][:, 0],
                                np.arange(7) + 0.5)
  np.testing.assert_array_equal(arrays["class_id"], np.arange(7) % 3)
  np.testing.assert_array_equal(arrays["verification"],
                                np.array([-1, 0, 1])[np.arange(7) % 3])


@pytest.mark.parametrize("bad_line, message", [
    (_tsv_line("k", "cat", 1, [1.0] * (DIM - 1)),
     "feature width 3, expected 4"),
    (_tsv_line("k", "wolf", 1, [1.0] * DIM), "unknown class name 'wolf'"),
    (_tsv_line("k", "cat", 1, [1.0, float("nan"), 1.0, 1.0]),
     "feature 1 is nan"),
    (_tsv_line("k", "cat", 2, [1.0] * DIM), "verification label '2' not in"),
    (_tsv_line("k", "cat", "x", [1.0] * DIM), "verification label 'x'"),
    (_tsv_line("k", "cat", 1, [1.0, "abc", 1.0, 1.0]),
     "unparsable feature value 'abc'"),
    ("k\tcat\t1\n", "expected 4 tab-separated columns"),
    (_tsv_line("", "cat", 1, [1.0] * DIM), "empty key"),
])
def test_tsv_errors_name_file_and_line(tmp_path, bad_line, message):
  lines = _good_lines(6)
  lines.insert(4, bad_line)
  tsv = _write_tsv(tmp_path / "train.tsv", lines)
  for chunk_rows in (2, 100):
    with pytest.raises(InputError) as e:
      list(data.read_authors_tsv(tsv, CLASSES, chunk_rows=chunk_rows))
    assert str(e.value).startswith(f"{tsv}:5: ")
    assert message in str(e.value)
    assert "\n" not in str(e.value)
  with pytest.raises(InputError, match="train.tsv:5: "):
    data.convert_tsv(tsv, CLASSES, tmp_path / "fs")
  assert not os.path.exists(tmp_path / "fs" / "metadata.json")


def test_tsv_empty_file(tmp_path):
  tsv = _write_tsv(tmp_path / "empty.tsv", [])
  with pytest.raises(InputError, match=r"empty.tsv: no rows"):
    list(data.read_authors_tsv(tsv, CLASSES))


def test_tsv_given_dim_is_checked(tmp_path):
  tsv = _write_tsv(tmp_path / "train.tsv", _good_lines(3))
  with pytest.raises(InputError, match="train.tsv:1: feature width 4, "
                     "expected 8"):
    list(data.read_authors_tsv(tsv, CLASSES, dim=8))


def test_convert_tsv_with_rejects_loses_nothing(tmp_path):
  bad = {
      2: _tsv_line("b2", "cat", 1, [1.0] * (DIM + 1)),
      5: _tsv_line("b5", "wolf", 0, [1.0] * DIM),
      6: _tsv_line("b6", "dog", 0, [1.0, 2.0, float("inf"), 3.0]),
      9: _tsv_line("b9", "fox", 2, [1.0] * DIM),
  }
  first = _good_lines(6)
  for line in sorted(bad):
    first.insert(line - 1, bad[line])
  tsv1 = _write_tsv(tmp_path / "a.tsv", first)
  tsv2 = tmp_path / "b.tsv"
  tsv2.write_bytes("".join(_good_lines(4)[::-1]).encode() + b"k\xff\n")
  rejects_path = tmp_path / "rejects.tsv"

  info = data.convert_tsv([tsv1, tsv2], CLASSES, tmp_path / "fs",
                          rows_per_shard=4, rejects_path=rejects_path)

  rejects = [line.split("\t", 3)
             for line in rejects_path.read_text().splitlines()]
  assert [(r[0], int(r[1])) for r in rejects] == (
      [(str(tsv1), line) for line in sorted(bad)] + [(str(tsv2), 5)])
  reasons = [r[2] for r in rejects]
  assert reasons[0] == "feature width 5, expected 4"
  assert reasons[1] == "unknown class name 'wolf'"
  assert reasons[2] == "feature 2 is inf"
  assert reasons[3].startswith("verification label '2'")
  assert reasons[4] == "not valid UTF-8"
  assert [r[3] for r in rejects[:4]] == [bad[line].rstrip("\n")
                                         for line in sorted(bad)]
  # Every input line is either in the feature set or in the rejects.
  assert info.num_rows + len(rejects) == len(first) + 5
  keys = data.load_arrays(info, "all")["key"].tolist()
  assert keys == [f"k{i}".encode() for i in range(6)] + [
      f"k{i}".encode() for i in range(3, -1, -1)]
  assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
