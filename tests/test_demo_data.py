"""Tests for cleannet_tf.demo_data."""

import os

import numpy as np
import pytest

from cleannet_tf import data, demo_data


@pytest.fixture(scope="module")
def clean_labels():
  # The digits class sizes (about 180 each) without loading the images.
  return np.repeat(np.arange(10, dtype=np.int64), 180)


@pytest.fixture(scope="module")
def demo():
  return demo_data.make_digits_demo(seed=0)


def test_label_noise_rate_near_requested(clean_labels):
  noisy = demo_data.make_label_noise(clean_labels, noise_rate=0.3, seed=0)
  assert noisy.dtype == np.int64
  assert noisy.shape == clean_labels.shape
  assert abs(np.mean(noisy != clean_labels) - 0.3) <= 0.05


def test_label_noise_rate_holds_per_class(clean_labels):
  noisy = demo_data.make_label_noise(clean_labels, noise_rate=0.3, seed=0)
  for c in range(10):
    rows = clean_labels == c
    assert abs(np.mean(noisy[rows] != c) - 0.3) <= 0.05


def test_label_noise_flips_only_to_confusable_classes(clean_labels):
  noisy = demo_data.make_label_noise(clean_labels, noise_rate=0.3, seed=0)
  flipped = np.flatnonzero(noisy != clean_labels)
  assert flipped.size
  for i in flipped:
    assert noisy[i] in demo_data.CONFUSION_MAP[int(clean_labels[i])]


def test_confusion_map_covers_every_class_without_self_flips():
  assert sorted(demo_data.CONFUSION_MAP) == list(range(10))
  for c, targets in demo_data.CONFUSION_MAP.items():
    assert 1 <= len(targets) <= 2
    assert c not in targets
    assert all(0 <= t < 10 for t in targets)


def test_label_noise_is_deterministic_for_a_seed(clean_labels):
  a = demo_data.make_label_noise(clean_labels, seed=3)
  b = demo_data.make_label_noise(clean_labels, seed=3)
  c = demo_data.make_label_noise(clean_labels, seed=4)
  np.testing.assert_array_equal(a, b)
  assert np.any(a != c)


def test_label_noise_rejects_bad_input(clean_labels):
  with pytest.raises(ValueError):
    demo_data.make_label_noise(clean_labels, noise_rate=1.5)
  with pytest.raises(ValueError):
    demo_data.make_label_noise(np.array([0, 10]))


def test_verification_labels(clean_labels):
  noisy = demo_data.make_label_noise(clean_labels, seed=0)
  verified_classes = np.array([1, 3, 8])
  verification = demo_data.make_verification_labels(
      clean_labels, noisy, verified_classes, fraction=0.1, seed=0)
  assert verification.dtype == np.int64
  assert set(np.unique(verification)) <= {-1, 0, 1}
  labelled = verification >= 0
  # Only images whose NOISY label is a verified class are labelled.
  assert np.all(np.isin(noisy[labelled], verified_classes))
  for c in verified_classes:
    in_class = noisy == c
    assert abs(np.mean(labelled[in_class]) - 0.1) <= 0.02
  np.testing.assert_array_equal(
      verification[labelled] == 1,
      noisy[labelled] == clean_labels[labelled])
  assert np.any(verification == 0) and np.any(verification == 1)


def test_verification_labels_are_deterministic_for_a_seed(clean_labels):
  noisy = demo_data.make_label_noise(clean_labels, seed=0)
  a = demo_data.make_verification_labels(clean_labels, noisy, [2, 5], seed=1)
  b = demo_data.make_verification_labels(clean_labels, noisy, [2, 5], seed=1)
  np.testing.assert_array_equal(a, b)


def test_verification_labels_reject_bad_input(clean_labels):
  with pytest.raises(ValueError):
    demo_data.make_verification_labels(clean_labels, clean_labels[:-1], [0])
  with pytest.raises(ValueError):
    demo_data.make_verification_labels(clean_labels, clean_labels, [0],
                                       fraction=0.0)


def test_demo_shapes_and_dtypes(demo):
  n = 1797
  assert demo.keys.shape == (n,) and demo.keys.dtype == object
  assert demo.images.shape == (n, 8, 8, 1)
  assert demo.images.dtype == np.float32
  assert demo.images.min() >= 0.0 and demo.images.max() <= 1.0
  for labels in (demo.clean_labels, demo.noisy_labels, demo.verification):
    assert labels.shape == (n,) and labels.dtype == np.int64
  assert demo.features.shape == (n, demo_data.FEATURE_DIM)
  assert demo.features.dtype == np.float32
  assert demo.verified_classes.dtype == np.int64
  assert demo.verified_classes.shape == (5,)
  assert demo.class_names == tuple(str(c) for c in range(10))


def test_demo_features_finite_and_non_negative(demo):
  assert np.all(np.isfinite(demo.features))
  assert np.all(demo.features >= 0.0)
  # The ReLU layer is not dead: most features vary across images.
  assert np.sum(demo.features.std(axis=0) > 0) >= demo_data.FEATURE_DIM // 2


def test_demo_labels_are_consistent(demo):
  assert demo.noise_rate == pytest.approx(
      np.mean(demo.noisy_labels != demo.clean_labels))
  assert abs(demo.noise_rate - 0.3) <= 0.05
  labelled = demo.verification >= 0
  assert np.all(np.isin(demo.noisy_labels[labelled], demo.verified_classes))
  np.testing.assert_array_equal(
      demo.verification[labelled] == 1,
      demo.noisy_labels[labelled] == demo.clean_labels[labelled])
  # Trained on noisy labels but not memorising them: above chance, and not
  # much above the 70% that predicting the clean class would score.
  assert 0.5 < demo.classifier_noisy_accuracy < 0.8


def test_demo_keys_are_deterministic(demo):
  assert demo.keys[0] == "digits-00000"
  assert demo.keys[17] == "digits-00017"
  assert len(set(demo.keys)) == demo.keys.size


def test_demo_rejects_too_many_verified_classes():
  with pytest.raises(ValueError):
    demo_data.make_digits_demo(num_verified_classes=11)


def test_demo_feature_set_is_written_once_with_every_row(demo, tmp_path):
  info = demo.feature_set(str(tmp_path / "features"))
  assert info.num_rows == demo.keys.size and info.dim == demo_data.FEATURE_DIM
  rows = data.load_arrays(info, verification="all")
  np.testing.assert_allclose(rows["features"], demo.features)
  np.testing.assert_array_equal(rows["class_id"], demo.noisy_labels)
  np.testing.assert_array_equal(rows["verification"], demo.verification)
  written = os.path.getmtime(tmp_path / "features" / "metadata.json")
  assert demo.feature_set(str(tmp_path / "features")).num_rows == info.num_rows
  assert os.path.getmtime(tmp_path / "features" / "metadata.json") == written
