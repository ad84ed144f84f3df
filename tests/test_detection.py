"""Tests of cleannet_tf.detection: eq. 11-13, metrics and threshold search."""

import numpy as np
import pytest

from cleannet_tf import detection
from cleannet_tf.errors import InputError

# Hand-made verified rows, two classes (ids 0 and 3: id 1, 2 have no rows and
# must not count as classes).
#   class 0: truth [1, 1, 0, 0], scores [0.9, 0.3, 0.6, 0.1]
#   class 3: truth [1, 0, 0],    scores [0.8, 0.2, 0.7]
CLASS_IDS = np.array([0, 0, 0, 0, 3, 3, 3])
TRUTH = np.array([1, 1, 0, 0, 1, 0, 0])
SCORES = np.array([0.9, 0.3, 0.6, 0.1, 0.8, 0.2, 0.7])


def test_decisions_eq11():
  np.testing.assert_array_equal(
      detection.decisions([0.2, 0.5, 0.7, -1.0], 0.5), [0, 1, 1, 0])
  assert detection.decisions(np.zeros(3), 0.0).dtype == np.int64


def test_sample_weights():
  scores = np.array([-0.4, 0.0, 0.3, 0.9], np.float32)
  w_soft, w_hard = detection.sample_weights(scores, 0.3)
  assert w_soft.dtype == np.float32 and w_hard.dtype == np.float32
  np.testing.assert_allclose(w_soft, [0.0, 0.0, 0.3, 0.9])
  np.testing.assert_array_equal(w_hard, detection.decisions(scores, 0.3))
  np.testing.assert_array_equal(w_hard, [0, 0, 1, 1])


def test_drawn_rows_is_what_the_weighted_drawing_trains_on():
  truth = np.array([1, 1, 1, 0])
  # Kept with probability w / max(w): 1, 1, 0.5 and 0.5 of a pass.
  drawn = detection.drawn_rows(np.array([0.8, 0.8, 0.4, 0.4]), truth)
  assert drawn == pytest.approx({"drawn_share": 0.75, "drawn_noise_rate": 0.5 / 3,
                                 "correct_kept": 2.5 / 3})
  # Equal weights draw every row: the labels' own noise, every correct row.
  assert detection.drawn_rows(np.full(4, 0.3), truth) == pytest.approx(
      {"drawn_share": 1.0, "drawn_noise_rate": 0.25, "correct_kept": 1.0})
  assert detection.drawn_rows(np.zeros(4), truth)["drawn_noise_rate"] is None
  with pytest.raises(InputError, match="one value per row"):
    detection.drawn_rows(np.ones(3), truth)


def test_balance_per_class_gives_every_class_mean_weight_one():
  weights = np.array([0.1, 0.3, 0.0, 0.8, 0.4, 0.0, 0.0], np.float32)
  class_ids = np.array([0, 0, 0, 1, 1, 2, 2])
  balanced = detection.balance_per_class(weights, class_ids)
  # Class 0: total 0.4 over 3 rows -> x7.5; class 1: 1.2 over 2 -> x5/3;
  # class 2 has no weight and keeps 0.
  np.testing.assert_allclose(balanced, [0.75, 2.25, 0.0, 4 / 3, 2 / 3, 0.0, 0.0], rtol=1e-6)
  assert balanced.dtype == np.float32


def test_detection_metrics_hand_computed():
  m = detection.detection_metrics(CLASS_IDS, TRUTH, SCORES, 0.5)
  # delta 0.5 -> decisions class 0: [1, 0, 1, 0] vs truth [1, 1, 0, 0]:
  # 2 wrong of 4 = 1/2; class 3: [1, 0, 1] vs [1, 0, 0]: 1 wrong of 3 = 1/3.
  # avg = (1/2 + 1/3) / 2 = 5/12; overall = 3 wrong / 7 rows.
  assert m["avg_class_error"] == pytest.approx(5 / 12)
  assert m["overall_error"] == pytest.approx(3 / 7)
  # Flagged (decision 0): 0.3 (clean), 0.1 (mislabeled), 0.2 (mislabeled):
  # precision 2/3. Mislabeled rows: 0.6, 0.1, 0.2, 0.7, caught 2: recall 2/4.
  assert m["precision_mislabeled"] == pytest.approx(2 / 3)
  assert m["recall_mislabeled"] == pytest.approx(1 / 2)
  assert m["num_rows"] == 7 and m["num_classes"] == 2 and m["delta"] == 0.5


def test_detection_metrics_zero_division_is_zero():
  # Nothing flagged and nothing mislabeled: 0/0 precision and recall -> 0.0.
  m = detection.detection_metrics([0, 0], [1, 1], [0.8, 0.9], 0.1)
  assert m["precision_mislabeled"] == 0.0 and m["recall_mislabeled"] == 0.0
  assert m["avg_class_error"] == 0.0


def test_average_per_class_error_weights_classes_equally():
  # Class 0: 1 wrong of 1 -> 1.0; class 5: 0 wrong of 3 -> 0.0; mean 0.5
  # (not 1/4, the row-weighted error).
  err = detection.average_per_class_error(
      [0, 5, 5, 5], [1, 1, 0, 1], [0, 1, 0, 1])
  assert err == pytest.approx(0.5)


def test_select_threshold_hand_computed_non_separable():
  # Row weight 1 / (C * n_c): class 0 rows 1/8, class 3 rows 1/6. Error per
  # delta interval = weight of clean rows below + mislabeled rows at/above:
  #   <=0.1: 2/8 + 2/6 = 14/24   (0.1,0.2]: 1/8 + 2/6 = 11/24
  #   (0.2,0.3]: 1/8 + 1/6 = 7/24  (0.3,0.6]: 1/8 + 1/8 + 1/6 = 10/24
  #   (0.6,0.7]: 1/8 + 1/6 = 7/24  (0.7,0.8]: 1/8 = 3/24 (best)
  #   (0.8,0.9]: 1/8 + 1/6 = 7/24  >0.9: 2/8 + 1/6 = 10/24
  delta, err = detection.select_threshold(CLASS_IDS, TRUTH, SCORES)
  assert err == pytest.approx(3 / 24)
  assert delta == pytest.approx(0.75)  # the midpoint of (0.7, 0.8]


def test_select_threshold_separable():
  rng = np.random.default_rng(0)
  class_ids = rng.integers(0, 4, size=200)
  truth = rng.integers(0, 2, size=200)
  scores = np.where(truth == 1, rng.uniform(0.5, 1.0, 200),
                    rng.uniform(-1.0, 0.2, 200))
  delta, err = detection.select_threshold(class_ids, truth, scores)
  assert err == 0.0
  assert scores[truth == 0].max() < delta < scores[truth == 1].min()


def test_select_threshold_ties_take_median_candidate():
  # 0.3, 0.4 and 0.5 all separate perfectly; 0.9 does not. Median is 0.4.
  delta, err = detection.select_threshold(
      [0] * 5, [0, 0, 1, 1, 1], [0.1, 0.2, 0.6, 0.7, 0.8],
      candidates=[0.9, 0.5, 0.3, 0.4])
  assert (delta, err) == (0.4, 0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_select_threshold_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  n = 300
  class_ids = rng.integers(0, 7, size=n)
  truth = rng.integers(0, 2, size=n)
  # Rounded to make ties between scores; signal depends on truth.
  scores = np.round(rng.normal(size=n) * 0.3 + 0.4 * truth, 2)
  delta, err = detection.select_threshold(class_ids, truth, scores)
  brute = [detection.average_per_class_error(class_ids, truth,
                                             detection.decisions(scores, t))
           for t in detection.default_candidates(scores)]
  assert err == pytest.approx(min(brute), abs=1e-12)
  assert detection.average_per_class_error(
      class_ids, truth, detection.decisions(scores, delta)) == err


def _brute_force_tie_band(class_ids, truth, scores, tie_band):
  """select_threshold's band rule spelled out candidate by candidate."""
  rows = np.bincount(class_ids)
  weight = 1.0 / (np.count_nonzero(rows) * rows[class_ids])
  candidates = detection.default_candidates(scores)
  errors = np.array([detection.average_per_class_error(
      class_ids, truth, detection.decisions(scores, t)) for t in candidates])
  exact, _ = detection.select_threshold(class_ids, truth, scores)
  exact_error = errors[candidates == exact][0]
  tied = []
  for t, error in zip(candidates, errors):
    between = (scores >= min(t, exact)) & (scores < max(t, exact))
    if error <= exact_error + tie_band * np.sqrt(np.sum(weight[between] ** 2)) + 1e-9:
      tied.append(t)
  tied = np.array(tied)
  return tied[np.argmin(np.abs(tied - np.median(tied)))]


@pytest.mark.parametrize("seed,tie_band", [(0, 0.5), (1, 1.0), (2, 2.0)])
def test_select_threshold_tie_band_matches_brute_force(seed, tie_band):
  rng = np.random.default_rng(seed)
  n = 200
  class_ids = rng.integers(0, 5, size=n)
  truth = (rng.uniform(size=n) > 0.1).astype(np.int64)  # few mislabeled rows
  scores = np.round(rng.normal(size=n) * 0.3 + 0.3 * truth, 2)
  delta, err = detection.select_threshold(class_ids, truth, scores, tie_band=tie_band)
  assert delta == _brute_force_tie_band(class_ids, truth, scores, tie_band)
  assert err == detection.average_per_class_error(
      class_ids, truth, detection.decisions(scores, delta))


def test_select_threshold_tie_band_takes_middle_of_flat_optimum():
  # One class, scores 0.00..0.99. Among the 40 lowest, every other row is
  # mislabeled, so flagging them is a wash (error 0.22 for any even number
  # flagged), but 36-39 are all mislabeled: by the luck of those two rows the
  # exact minimum (0.18) is at the top of the flat range, flagging all 40. The
  # band (two rows are within one standard deviation of 40 rows' difference)
  # takes the middle of the range instead.
  scores = np.arange(100) / 100
  truth = np.ones(100, np.int64)
  truth[0:40:2] = 0
  truth[36:40] = 0
  class_ids = np.zeros(100, np.int64)
  exact, exact_error = detection.select_threshold(class_ids, truth, scores)
  banded, banded_error = detection.select_threshold(class_ids, truth, scores, tie_band=1.0)
  assert exact == pytest.approx(0.395) and exact_error == pytest.approx(0.18)
  assert 0.15 < banded < 0.25 and banded_error == pytest.approx(0.22)
  # A sharp optimum (separable rows) stays where the exact rule puts it.
  separable = (scores >= 0.5).astype(np.int64)
  assert detection.select_threshold(class_ids, separable, scores, tie_band=1.0)[0] == \
      detection.select_threshold(class_ids, separable, scores)[0]


def test_transfer_tie_band():
  assert detection.transfer_tie_band([0, 1, 1], [0, 1]) == 0.0
  assert detection.transfer_tie_band([0, 1, 1], np.arange(3)) == detection.TRANSFER_TIE_BAND
  assert detection.TRANSFER_TIE_BAND > 0


def test_select_threshold_rejects_negative_tie_band():
  with pytest.raises(InputError, match="tie_band must be >= 0"):
    detection.select_threshold([0, 0], [1, 0], [0.5, 0.1], tie_band=-1)


def test_default_candidates():
  cands = detection.default_candidates(np.array([0.5, 0.1, 0.3, 0.3]))
  # Unique [0.1, 0.3, 0.5], mean gap 0.2 -> ends 0.0 and 0.6.
  np.testing.assert_allclose(cands, [0.0, 0.2, 0.4, 0.6])
  many = detection.default_candidates(
      np.random.default_rng(0).normal(size=10000), max_candidates=2048)
  assert many.size <= 2049 and np.all(np.diff(many) > 0)


def test_select_threshold_empty_input():
  with pytest.raises(InputError, match="select_threshold: no verified rows"):
    detection.select_threshold([], [], [])


def test_bad_input_raises_input_error():
  with pytest.raises(InputError, match="truth"):
    detection.detection_metrics([0, 1], [1, 2], [0.1, 0.2], 0.5)
  with pytest.raises(InputError, match="scores"):
    detection.select_threshold([0, 1], [1, 0], [0.1, np.nan])


def test_select_threshold_cv_separable():
  rng = np.random.default_rng(3)
  class_ids = np.repeat(np.arange(5), 40)
  truth = rng.integers(0, 2, size=200)
  scores = np.where(truth == 1, rng.uniform(0.5, 1.0, 200),
                    rng.uniform(-1.0, 0.2, 200))
  out = detection.select_threshold_cv(class_ids, truth, scores, folds=5)
  assert len(out["fold_errors"]) == 5 and len(out["fold_deltas"]) == 5
  assert out["cv_avg_class_error"] == 0.0
  assert scores[truth == 0].max() < out["delta"] < scores[truth == 1].min()
  # Deterministic for a seed.
  assert detection.select_threshold_cv(class_ids, truth, scores) == out


def test_select_threshold_cv_small_class_falls_back_to_kfold():
  # Class 3 holds 2 rows, fewer than 5 folds: stratification impossible.
  class_ids = np.concatenate([np.repeat([0, 1, 2], 20), [3, 3]])
  truth = np.tile([0, 1], 31)
  scores = np.where(truth == 1, 0.8, 0.1) + np.linspace(0, 0.05, 62)
  out = detection.select_threshold_cv(class_ids, truth, scores, folds=5)
  assert len(out["fold_errors"]) == 5
  assert out["cv_avg_class_error"] == pytest.approx(np.mean(out["fold_errors"]))


def _logistic_rows(rng, n, slope, intercept, num_classes=4):
  """(class_ids, truth, scores): truth ~ Bernoulli(sigmoid(slope * score + intercept))."""
  scores = rng.uniform(-1, 1, n)
  truth = (rng.random(n) < 1 / (1 + np.exp(-(slope * scores + intercept)))).astype(np.int64)
  return rng.integers(0, num_classes, n), truth, scores


def test_calibrated_threshold_finds_where_p_clean_crosses_one_half():
  # P(clean | score) = sigmoid(8 * score - 2) crosses 1/2 at 0.25.
  class_ids, truth, scores = _logistic_rows(np.random.default_rng(0), 20_000, 8.0, -2.0)
  delta, error = detection.calibrated_threshold(class_ids, truth, scores)
  assert delta == pytest.approx(0.25, abs=0.02)
  assert error == detection.average_per_class_error(
      class_ids, truth, detection.decisions(scores, delta))


def test_calibrated_threshold_weighs_classes_equally():
  # Duplicating one class's rows leaves the per-class weighted fit unchanged.
  class_ids, truth, scores = _logistic_rows(np.random.default_rng(1), 400, 6.0, 0.0)
  extra = class_ids == 0
  repeated = [np.concatenate([a] + [a[extra]] * 3) for a in (class_ids, truth, scores)]
  assert detection.calibrated_threshold(*repeated)[0] == pytest.approx(
      detection.calibrated_threshold(class_ids, truth, scores)[0], abs=1e-4)


def test_calibrated_threshold_varies_less_than_the_minimum_with_few_mislabeled_rows():
  # 500 rows, about a fifth mislabeled, crossing at -0.6: the exact minimum
  # wanders over a flat error curve from sample to sample.
  rng = np.random.default_rng(2)
  calibrated, minimum = [], []
  for _ in range(30):
    class_ids, truth, scores = _logistic_rows(rng, 500, 10.0, 6.0, num_classes=10)
    calibrated.append(detection.calibrated_threshold(class_ids, truth, scores)[0])
    minimum.append(detection.select_threshold(class_ids, truth, scores)[0])
  assert np.std(calibrated) < 0.5 * np.std(minimum)
  assert np.mean(calibrated) == pytest.approx(-0.6, abs=0.03)


@pytest.mark.parametrize("truth, scores", [
    ([1, 1, 1, 1], [0.1, 0.5, 0.2, 0.9]),  # no mislabeled row
    ([1, 0, 1, 0], [0.3, 0.3, 0.3, 0.3]),  # one score
    ([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]),  # higher scores less often clean
])
def test_calibrated_threshold_falls_back_to_the_minimum_when_the_fit_cannot_say(truth,
                                                                                scores):
  class_ids = [0, 1, 0, 1]
  assert detection.calibrated_threshold(class_ids, truth, scores) == \
      detection.select_threshold(class_ids, truth, scores)


def test_choose_threshold_dispatches_on_the_rule():
  class_ids, truth, scores = _logistic_rows(np.random.default_rng(3), 300, 5.0, 1.0)
  assert detection.choose_threshold(class_ids, truth, scores) == \
      detection.calibrated_threshold(class_ids, truth, scores)
  assert detection.choose_threshold(class_ids, truth, scores, "minimum", 1.0) == \
      detection.select_threshold(class_ids, truth, scores, tie_band=1.0)
  with pytest.raises(InputError, match="threshold rule 'median': must be one of"):
    detection.choose_threshold(class_ids, truth, scores, "median")
  with pytest.raises(InputError, match="calibrated_threshold: no verified rows"):
    detection.calibrated_threshold([], [], [])


def test_select_threshold_cv_of_the_calibrated_rule():
  class_ids, truth, scores = _logistic_rows(np.random.default_rng(4), 300, 5.0, 1.0)
  out = detection.select_threshold_cv(class_ids, truth, scores, rule="calibrated")
  assert out["delta"] == detection.calibrated_threshold(class_ids, truth, scores)[0]
  assert out["fold_deltas"] != detection.select_threshold_cv(class_ids, truth, scores)[
      "fold_deltas"]


def test_decisions_and_weights_take_one_threshold_per_row():
  scores = np.array([0.2, 0.5, 0.7])
  np.testing.assert_array_equal(detection.decisions(scores, [0.1, 0.6, 0.6]), [1, 0, 1])
  _, w_hard = detection.sample_weights(scores, np.array([0.3, 0.3, 0.8]))
  np.testing.assert_array_equal(w_hard, [0, 1, 0])
  m = detection.detection_metrics([0, 0, 1], [1, 1, 0], scores, [0.1, 0.6, 0.6])
  assert m["avg_class_error"] == pytest.approx((1 / 2 + 1) / 2) and m["delta"] is None
  with pytest.raises(InputError, match="shape"):
    detection.decisions(scores, [0.1, 0.2])
  with pytest.raises(InputError, match="NaN"):
    detection.decisions(scores, [0.1, np.nan, 0.2])


def test_class_score_quartiles_match_numpy_percentiles_and_stream():
  rng = np.random.default_rng(0)
  # Enough rows that neighbouring order statistics lie far closer than a bin.
  class_ids = rng.integers(0, 3, 60_000)
  scores = np.tanh(rng.normal(class_ids * 0.3, 0.4))
  quartiles = detection.ClassScoreQuartiles(4)
  for start in range(0, 60_000, 7000):
    quartiles.add(class_ids[start:start + 7000], scores[start:start + 7000])
  quartiles.add(np.zeros(0, np.int64), np.zeros(0))
  found = quartiles.quartiles()
  for c in range(3):
    expected = np.percentile(scores[class_ids == c], [25, 50, 75])
    np.testing.assert_allclose(found[c], expected, atol=2 / detection.SCORE_BINS)
  assert np.isnan(found[3]).all()  # no rows
  with pytest.raises(InputError, match="class id 4"):
    quartiles.add([4], [0.5])
  with pytest.raises(InputError, match="NaN"):
    quartiles.add([0], [np.nan])


def test_class_thresholds_move_delta_for_unverified_classes_only():
  # Verified classes 0 and 1: mean median 0.2, mean spread 0.4. Class 2,
  # unverified, sits at median -0.1 with spread 0.2: delta 0.3 (0.1 above the
  # verified median, a quarter of their spread) moves to -0.1 + 0.25 * 0.2.
  quartiles = np.array([[0.0, 0.3, 0.5], [-0.1, 0.1, 0.2], [-0.2, -0.1, 0.0],
                        [np.nan] * 3, [0.1, 0.1, 0.1]])
  verified = np.array([1, 1, 0, 0, 0])
  thresholds = detection.class_thresholds(0.3, quartiles, verified)
  np.testing.assert_allclose(thresholds, [0.3, 0.3, -0.1 + 0.25 * 0.2, 0.3, 0.3])
  # Every class verified, or none with usable quartiles: delta for all.
  np.testing.assert_array_equal(detection.class_thresholds(0.3, quartiles, np.ones(5)),
                                np.full(5, 0.3))
  np.testing.assert_array_equal(
      detection.class_thresholds(0.3, np.zeros((5, 3)), verified), np.full(5, 0.3))
  with pytest.raises(InputError, match=r"\[L, 3\]"):
    detection.class_thresholds(0.3, np.zeros((5, 2)), verified)
  with pytest.raises(InputError, match="verified_classes"):
    detection.class_thresholds(0.3, quartiles, np.ones(4))


def test_class_thresholds_decide_like_delta_on_rank_matched_scores():
  # A class whose scores are a scaled, shifted copy of a verified class's is
  # decided row for row as that class is at delta.
  rng = np.random.default_rng(1)
  verified_scores = rng.uniform(-0.5, 0.9, 2000)
  moved_scores = 0.5 * verified_scores - 0.3
  quartiles = detection.ClassScoreQuartiles(2)
  quartiles.add(np.repeat([0, 1], 2000), np.concatenate([verified_scores, moved_scores]))
  thresholds = detection.class_thresholds(0.4, quartiles.quartiles(), [1, 0])
  agree = np.mean(detection.decisions(verified_scores, 0.4)
                  == detection.decisions(moved_scores, thresholds[1]))
  assert agree > 0.995
