"""Tests of cleannet_tf.references: building, saving, loading reference sets."""

import os
import re

import numpy as np
import pytest

from cleannet_tf import references
from cleannet_tf.errors import InputError

CENTRES = np.array([[10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]])


def _blobs():
  """Class 0: 3 tight blobs of 60 rows; class 1: 2 rows; class 2: no rows.

  Rows of the classes are interleaved so grouping by class is exercised.
  """
  rng = np.random.default_rng(0)
  blob = np.repeat(CENTRES, 60, axis=0) + rng.normal(scale=0.3, size=(180, 3))
  small = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
  features = np.concatenate([blob[:90], small[:1], blob[90:], small[1:]])
  class_ids = np.concatenate([np.zeros(90), [1], np.zeros(90), [1]])
  return features.astype(np.float32), class_ids.astype(np.int64), small


def test_kmeans_recovers_blob_centres_and_pads():
  features, class_ids, small = _blobs()
  refs = references.build_kmeans_references(features, class_ids,
                                            num_classes=3, k=3)
  assert refs.features.dtype == np.float32 and refs.counts.dtype == np.int32
  assert (refs.num_classes, refs.k, refs.dim) == (3, 3, 3)
  np.testing.assert_array_equal(refs.counts, [3, 2, 0])
  # Each centre has a centroid within 0.2 (noise 0.3 over 60 rows: ~0.04).
  dist = np.linalg.norm(refs.features[0][:, None] - CENTRES[None], axis=-1)
  assert np.all(dist.min(axis=0) < 0.2)
  # Class with fewer rows than k: its rows, in input order, then zeros.
  np.testing.assert_array_equal(refs.features[1, :2], small)
  np.testing.assert_array_equal(refs.features[1, 2], 0.0)
  np.testing.assert_array_equal(refs.features[2], 0.0)


def test_kmeans_is_deterministic_for_a_seed():
  rng = np.random.default_rng(1)
  features = rng.normal(size=(300, 4)).astype(np.float32)
  class_ids = rng.integers(0, 2, size=300)
  a = references.build_kmeans_references(features, class_ids, 2, k=5, seed=7)
  b = references.build_kmeans_references(features, class_ids, 2, k=5, seed=7)
  np.testing.assert_array_equal(a.features, b.features)
  np.testing.assert_array_equal(a.counts, b.counts)


def test_random_references_sample_rows_without_replacement():
  features, class_ids, small = _blobs()
  refs = references.build_random_references(features, class_ids, 3, k=10,
                                            seed=3)
  np.testing.assert_array_equal(refs.counts, [10, 2, 0])
  class0 = features[class_ids == 0]
  # Every reference is a row of class 0, and no row is drawn twice.
  match = np.all(refs.features[0][:, None] == class0[None], axis=-1)
  assert np.all(match.sum(axis=1) == 1)
  assert len(np.unique(np.argmax(match, axis=1))) == 10
  np.testing.assert_array_equal(refs.features[1, :2], small)
  again = references.build_random_references(features, class_ids, 3, k=10,
                                             seed=3)
  np.testing.assert_array_equal(refs.features, again.features)


def test_builder_rejects_bad_class_ids():
  with pytest.raises(InputError, match="build_kmeans_references.*class_ids"):
    references.build_kmeans_references(np.zeros((2, 3)), [0, 5], 3, k=2)


def test_save_load_round_trip(tmp_path):
  features, class_ids, _ = _blobs()
  refs = references.build_random_references(features, class_ids, 3, k=4)
  path = tmp_path / "refs.npz"
  refs.save(path)
  assert os.listdir(tmp_path) == ["refs.npz"]  # no temporary file left
  loaded = references.ReferenceSets.load(path)
  np.testing.assert_array_equal(loaded.features, refs.features)
  np.testing.assert_array_equal(loaded.counts, refs.counts)
  assert loaded.counts.dtype == np.int32


def test_load_rejects_counts_above_k(tmp_path):
  path = tmp_path / "bad.npz"
  np.savez(path, features=np.zeros((2, 4, 3), np.float32),
           counts=np.array([4, 5], np.int32))
  with pytest.raises(InputError,
                     match=re.escape(f"{path}: counts[1] = 5 is outside")):
    references.ReferenceSets.load(path)


def test_load_rejects_unreadable_or_incomplete_files(tmp_path):
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"not a zip file")
  with pytest.raises(InputError, match=re.escape(str(garbage))):
    references.ReferenceSets.load(garbage)
  partial = tmp_path / "partial.npz"
  np.savez(partial, features=np.zeros((1, 2, 3), np.float32))
  with pytest.raises(InputError,
                     match=re.escape(f"{partial}: missing array(s)")):
    references.ReferenceSets.load(partial)
  padded = tmp_path / "padded.npz"
  np.savez(padded, features=np.ones((1, 2, 3), np.float32),
           counts=np.array([1], np.int32))
  with pytest.raises(InputError, match=re.escape(f"{padded}: class 0 has")):
    references.ReferenceSets.load(padded)
