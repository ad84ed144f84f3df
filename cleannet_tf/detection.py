"""Label-noise detection by thresholding, its metrics, and sample weights.

Paper Sec. 3.2-3.3, eq. 11-13. A row is an image with a noisy class label and
a CleanNet score cos(phi_q, phi_c^s). Conventions used throughout:

* truth (verification label): 1 = the class label is correct ("clean"),
  0 = mislabeled.
* decision (eq. 11): 1 = keep as clean if score >= delta, else 0 = flag as
  mislabeled.

The paper reports the average over classes of the per-class error rate and
picks one threshold delta for all classes on verified rows; both are here,
with two rules for the pick (``choose_threshold``).
"""

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold, StratifiedKFold

from cleannet_tf.errors import InputError

# Default cap on the number of candidate thresholds searched.
MAX_CANDIDATES = 2048

# Candidates whose average error is within this of the best count as tied: the
# error is a float sum over rows, so equal errors may differ by rounding noise.
_TIE_TOLERANCE = 1e-9

# Default width, in standard deviations of the paired error difference, of the
# band of candidates treated as tied with the best when the threshold will also
# be applied to classes without verified rows (``transfer_tie_band``;
# ``training.TrainConfig.threshold_tie_band`` says why 1).
TRANSFER_TIE_BAND = 1.0

# How delta is chosen on verified rows (``choose_threshold``): "calibrated",
# where a logistic fit of the verification labels on the score crosses 1/2,
# or "minimum", the lowest error over candidate thresholds (the paper's).
THRESHOLD_RULES = ("calibrated", "minimum")

# Inverse L2 strength of the calibration fit: next to no shrinkage, only
# enough to keep the slope finite when the verified rows are separable.
_CALIBRATION_C = 1e4


def _check_delta(fn, delta, shape=None):
  """A scalar delta as float; per-row thresholds as float64 of `shape`."""
  if np.ndim(delta) == 0:
    delta = float(delta)
    if np.isnan(delta):
      raise InputError(f"{fn}: delta is NaN")
    return delta
  delta = np.asarray(delta, np.float64)
  if shape is not None and delta.shape != tuple(shape):
    raise InputError(f"{fn}: per-row delta must have the scores' shape {tuple(shape)}, "
                     f"got {delta.shape}")
  if np.isnan(delta).any():
    raise InputError(f"{fn}: delta contains NaN")
  return delta


def _check_scores(fn, scores):
  scores = np.asarray(scores)
  if not np.issubdtype(scores.dtype, np.number) or np.iscomplexobj(scores):
    raise InputError(f"{fn}: scores must be real numbers, got {scores.dtype}")
  if not np.all(np.isfinite(scores)):
    raise InputError(f"{fn}: scores contain NaN or Inf")
  return scores


def _check_binary(fn, name, values, n):
  values = np.asarray(values)
  if values.shape != (n,):
    raise InputError(f"{fn}: {name} must have shape ({n},), got "
                     f"{values.shape}")
  if values.size and not np.all((values == 0) | (values == 1)):
    raise InputError(f"{fn}: {name} must contain only 0 and 1")
  return values.astype(np.int64)


def _check_class_ids(fn, class_ids):
  class_ids = np.asarray(class_ids)
  if class_ids.ndim != 1:
    raise InputError(f"{fn}: class_ids must be 1-D, got shape "
                     f"{class_ids.shape}")
  if not class_ids.size:
    raise InputError(f"{fn}: no rows")
  if not np.issubdtype(class_ids.dtype, np.integer):
    raise InputError(f"{fn}: class_ids must be integers, got "
                     f"{class_ids.dtype}")
  if class_ids.min() < 0:
    raise InputError(f"{fn}: class_ids must be >= 0, got {class_ids.min()}")
  return class_ids.astype(np.int64)


def _check_rows(fn, class_ids, truth, scores):
  """Validates the (class_ids, truth, scores) triple of a metric call.

  Returns:
    (class_ids int64 [N], truth int64 [N], scores float64 [N]).
  """
  class_ids = _check_class_ids(fn, class_ids)
  truth = _check_binary(fn, "truth", truth, class_ids.size)
  scores = _check_scores(fn, scores)
  if scores.shape != class_ids.shape:
    raise InputError(f"{fn}: scores must have shape {class_ids.shape}, got "
                     f"{scores.shape}")
  return class_ids, truth, scores.astype(np.float64)


def decisions(scores, delta) -> np.ndarray:
  """Eq. 11: 1 (keep, clean) where score >= delta, else 0 (mislabeled).

  Args:
    scores: float array, any shape, finite.
    delta: the threshold, or one per score (``class_thresholds`` taken at each row's class).

  Returns:
    int64 array of the shape of `scores`.
  """
  scores = _check_scores("decisions", scores)
  return (scores >= _check_delta("decisions", delta, scores.shape)).astype(np.int64)


def sample_weights(scores, delta) -> tuple[np.ndarray, np.ndarray]:
  """Per-sample classifier-loss weights, eq. 12 and eq. 13.

  Args:
    scores: float array, any shape, finite; cosine similarity of each sample
      to the reference set of its noisy class.
    delta: the threshold of eq. 13, or one per score (``class_thresholds`` taken at each row's class).

  Returns:
    (w_soft, w_hard), float32 arrays of the shape of `scores`:
    w_soft = max(0, score); w_hard = 1 where score >= delta else 0.
  """
  scores = _check_scores("sample_weights", scores)
  w_soft = np.maximum(scores, 0).astype(np.float32)
  w_hard = (scores >= _check_delta("sample_weights", delta, scores.shape)).astype(np.float32)
  return w_soft, w_hard


def drawn_rows(weights, truth) -> dict:
  """What a classifier trained by drawing rows with probability w / max(w) sees.

  The default weighted training (``classifier.ClassifierConfig``'s
  sample_weighting "sampling") keeps row i with probability w_i / max(w). Against
  drawing every row once, this returns the share of rows drawn per pass, the
  share of wrong labels among the drawn rows (the noise the weighted
  classifier still trains on) and the share of the correct rows' draws kept.
  With CleanNet's held-out verified rows as `truth` (rows it did not train
  on) this estimates both on the rows without verification labels, which is
  how a user can see what a weighting still lets through.

  Args:
    weights: float [N], non-negative.
    truth: int or bool [N] in {0, 1}; 1 = the row's label is correct.

  Returns:
    {"drawn_share", "drawn_noise_rate" (None when every weight is 0: nothing
    is drawn), "correct_kept"}, floats.
  """
  weights = np.asarray(weights, np.float64)
  truth = np.asarray(truth)
  if weights.shape != truth.shape or weights.ndim != 1:
    raise InputError(f"drawn_rows: weights {weights.shape} and truth {truth.shape} must "
                     "be one value per row each")
  if not weights.any():
    return {"drawn_share": 0.0, "drawn_noise_rate": None, "correct_kept": 0.0}
  accept = weights / weights.max()
  return {"drawn_share": float(accept.mean()),
          "drawn_noise_rate": float(accept[truth == 0].sum() / accept.sum()),
          "correct_kept": float(accept[truth == 1].sum() / max(1, (truth == 1).sum()))}


def balance_per_class(weights, class_ids) -> np.ndarray:
  """Rescales sample weights so that each class's mean weight is 1.

  CleanNet's cosine scores sit at different levels in different classes, so
  raw w_soft also reweights whole classes (on CIFAR-10N their means differed
  5-7x) and lowers the loss scale; this keeps each class's total weight equal
  to its number of rows and only reorders weight within the class. A class
  whose weights are all 0 stays 0.

  Args:
    weights: float [N], non-negative.
    class_ids: int [N], the noisy class of each row.

  Returns:
    float32 [N].
  """
  weights = np.asarray(weights, np.float64)
  class_ids = np.asarray(class_ids, np.int64)
  counts = np.bincount(class_ids)
  totals = np.bincount(class_ids, weights, minlength=len(counts))
  scale = np.divide(counts, totals, out=np.zeros(len(counts)), where=totals > 0)
  return (weights * scale[class_ids]).astype(np.float32)


def average_per_class_error(class_ids, truth, decided) -> float:
  """The paper's metric: mean over classes of the within-class error rate.

  Only classes that have rows count, each with equal weight however many rows
  it has.

  Args:
    class_ids: int [N], >= 0, N >= 1.
    truth: int or bool [N] in {0, 1}; verification labels.
    decided: int or bool [N] in {0, 1}; decisions (eq. 11).

  Returns:
    The average error rate, in [0, 1].
  """
  fn = "average_per_class_error"
  class_ids = _check_class_ids(fn, class_ids)
  truth = _check_binary(fn, "truth", truth, class_ids.size)
  decided = _check_binary(fn, "decided", decided, class_ids.size)
  rows = np.bincount(class_ids)
  wrong = np.bincount(class_ids, weights=truth != decided,
                      minlength=rows.size)
  present = rows > 0
  return float(np.mean(wrong[present] / rows[present]))


def detection_metrics(class_ids, truth, scores, delta) -> dict:
  """Detection quality of threshold `delta` on verified rows.

  For precision and recall the positive class is "mislabeled": a true positive
  is a row with decision 0 and truth 0. Precision is 0.0 when no row is
  flagged, and recall is 0.0 when no row is mislabeled (0/0 is reported as 0,
  never NaN, so the dict stays JSON-safe and comparable).

  Args:
    class_ids: int [N], >= 0, N >= 1.
    truth: int or bool [N] in {0, 1}; verification labels.
    scores: float [N], finite.
    delta: the threshold, or one per row (``class_thresholds`` taken at each row's class).

  Returns:
    dict with float "avg_class_error", "overall_error",
    "precision_mislabeled", "recall_mislabeled", "delta" (None for per-row
    thresholds) and int "num_rows", "num_classes" (classes that have rows).
  """
  fn = "detection_metrics"
  class_ids, truth, scores = _check_rows(fn, class_ids, truth, scores)
  delta = _check_delta(fn, delta, scores.shape)
  decided = (scores >= delta).astype(np.int64)
  flagged = decided == 0
  mislabeled = truth == 0
  caught = int(np.count_nonzero(flagged & mislabeled))
  num_flagged = int(np.count_nonzero(flagged))
  num_mislabeled = int(np.count_nonzero(mislabeled))
  return {
      "avg_class_error": average_per_class_error(class_ids, truth, decided),
      "overall_error": float(np.mean(truth != decided)),
      "precision_mislabeled": caught / num_flagged if num_flagged else 0.0,
      "recall_mislabeled": caught / num_mislabeled if num_mislabeled else 0.0,
      "num_rows": int(class_ids.size),
      "num_classes": int(np.count_nonzero(np.bincount(class_ids))),
      "delta": delta if np.ndim(delta) == 0 else None,
  }


def default_candidates(scores, max_candidates=MAX_CANDIDATES) -> np.ndarray:
  """Candidate thresholds that realise every distinct decision on `scores`.

  The midpoints between consecutive sorted unique scores, plus one point half
  a mean gap below the minimum (keep all) and one above the maximum (flag
  all). Midpoints rather than the scores themselves keep the chosen delta away
  from any verified score, so it is not decided by float rounding on new data.
  With more than `max_candidates` unique scores, the unique scores are first
  thinned to `max_candidates` quantiles of the scores (actual score values,
  denser where the scores are).

  Args:
    scores: float [N], finite, N >= 1.
    max_candidates: cap on the number of unique scores used.

  Returns:
    float64 [T], sorted ascending, T <= max_candidates + 1.
  """
  scores = _check_scores("default_candidates", scores).astype(np.float64)
  if not scores.size:
    raise InputError("default_candidates: no scores")
  points = np.unique(scores)
  if points.size > max_candidates:
    points = np.unique(np.quantile(scores, np.linspace(0, 1, max_candidates),
                                   method="inverted_cdf"))
  gap = (points[-1] - points[0]) / (points.size - 1) if points.size > 1 else 1.0
  points = np.concatenate([[points[0] - gap], points, [points[-1] + gap]])
  return (points[:-1] + points[1:]) / 2


def _median_of_tied(candidates, tied):
  """Index of the tied candidate closest to the tied ones' median (the first such)."""
  tied = np.flatnonzero(tied)
  values = candidates[tied]
  return tied[np.argmin(np.abs(values - np.median(values)))]


def transfer_tie_band(chosen_on, applied_to, band=TRANSFER_TIE_BAND) -> float:
  """`tie_band` for a delta chosen on rows of classes `chosen_on`, used on `applied_to`.

  `band` when some class in `applied_to` is not in `chosen_on`, so that the
  one delta also decides classes it was not chosen on (their scores sit lower,
  having had no verified negatives in training, so an accidentally high delta
  flags many of their clean rows); else 0, exact ties: with every class
  verified, cross-validation on verified rows favoured the exact minimum.

  Args:
    chosen_on: int [N], class ids of the verified rows delta is chosen on.
    applied_to: int [M], class ids delta will decide (rows or a class range).
    band: the tie band for that case, >= 0.
  """
  unseen = np.setdiff1d(np.asarray(applied_to), np.asarray(chosen_on))
  return float(band) if unseen.size else 0.0


# Bins of the per-class score histograms of ``ClassScoreQuartiles``.
SCORE_BINS = 4000


class ClassScoreQuartiles:
  """Each class's 25th, 50th and 75th score percentiles, streamed.

  One histogram of SCORE_BINS bins over [-1, 1] (the range of a cosine) per
  class, so memory is L x SCORE_BINS whatever the number of rows; a
  percentile is read at the centre of the bin that holds it, within 2.5e-4.
  """

  def __init__(self, num_classes):
    self.counts = np.zeros((int(num_classes), SCORE_BINS), np.int64)

  def add(self, class_ids, scores):
    """Adds rows: class_ids int [B] in [0, L), scores float [B], finite."""
    fn = "ClassScoreQuartiles.add"
    scores = _check_scores(fn, scores)
    if not scores.size:
      return
    class_ids = _check_class_ids(fn, class_ids)
    if scores.shape != class_ids.shape:
      raise InputError(f"{fn}: scores must have shape {class_ids.shape}, got {scores.shape}")
    if class_ids.size and class_ids.max() >= len(self.counts):
      raise InputError(f"{fn}: class id {class_ids.max()} >= {len(self.counts)} classes")
    bins = np.clip(((scores + 1) / 2 * SCORE_BINS).astype(np.int64), 0, SCORE_BINS - 1)
    np.add.at(self.counts, (class_ids, bins), 1)

  def quartiles(self) -> np.ndarray:
    """float64 [L, 3]: the 25th, 50th and 75th percentile; NaN for a class without rows."""
    cumulative = np.cumsum(self.counts, axis=1)
    totals = cumulative[:, -1:]
    # The first bin whose cumulative count reaches the share of the rows.
    bins = np.stack([(cumulative < share * totals).sum(axis=1) for share in (0.25, 0.5, 0.75)],
                    axis=1)
    centres = -1 + (np.minimum(bins, SCORE_BINS - 1) + 0.5) * 2 / SCORE_BINS
    return np.where(totals > 0, centres, np.nan)


def class_thresholds(delta, score_quartiles, verified_classes) -> np.ndarray:
  """Per-class thresholds: delta, moved for the classes without verification labels.

  delta is chosen on the verified rows of the classes that have them. A class
  without verification labels was trained with no verified negatives of its
  own, so its scores sit elsewhere and one delta flags too many or too few of
  its rows. Such a class c gets delta at the same place in its own score
  distribution: with m and s the mean median and mean interquartile range of
  the verified classes' scores, delta_c = median_c + (delta - m) * iqr_c / s.
  No label of class c is used, only the quartiles of all its rows' scores.
  A verified class, or one without usable quartiles (no rows, no spread),
  keeps delta; so does every class when no verified class has usable ones.

  Not in the paper, which shares one delta, and off by default
  (``training.TrainConfig.transfer_thresholds`` says why): it assumes the
  quartiles say where a class's scores sit, which fails when the scores of
  correct and mislabelled rows are well apart (the quartiles then follow the
  class's noise rate). The ablation transfer_thresholds measures it.

  Args:
    delta: float, the shared threshold.
    score_quartiles: float [L, 3] (``ClassScoreQuartiles.quartiles``).
    verified_classes: [L] of {0, 1}: 1 for a class with verification labels.

  Returns:
    float64 [L].
  """
  fn = "class_thresholds"
  delta = _check_delta(fn, delta)
  quartiles = np.asarray(score_quartiles, np.float64)
  if quartiles.ndim != 2 or quartiles.shape[1] != 3:
    raise InputError(f"{fn}: score_quartiles must have shape [L, 3], got {quartiles.shape}")
  verified = _check_binary(fn, "verified_classes", verified_classes, len(quartiles)) == 1
  spread = quartiles[:, 2] - quartiles[:, 0]
  usable = np.isfinite(quartiles).all(axis=1) & (spread > 0)
  thresholds = np.full(len(quartiles), delta)
  reference = verified & usable
  if not reference.any():
    return thresholds
  median, typical_spread = quartiles[reference, 1].mean(), spread[reference].mean()
  moved = ~verified & usable
  thresholds[moved] = (quartiles[moved, 1]
                       + (delta - median) * spread[moved] / typical_spread)
  return thresholds


def select_threshold(class_ids, truth, scores, candidates=None,
                     tie_band=0.0) -> tuple[float, float]:
  """One threshold for all classes minimising the average per-class error.

  Paper Sec. 3.2: delta is chosen on verified (held-out) rows and shared by
  all classes. All candidates are evaluated at once: the average per-class
  error is a sum over rows of 1 / (C * n_c) for each wrong row (C classes with
  rows, n_c rows in the row's class), and a row is wrong at delta when it is
  clean with score < delta or mislabeled with score >= delta. So with rows
  sorted by score, cumulative sums of those weights give the error of every
  candidate in O((N + T) log N) time and O(N + T) memory.

  Ties: among the candidates whose error is within 1e-9 of the best, the one
  closest to their median (the first such, in ascending order) is taken, so a
  flat optimum gives a delta in its middle.

  With `tie_band` z > 0 a candidate also counts as tied when its error exceeds
  that choice's by at most z standard deviations of the difference between
  the two: the difference comes from the rows scored between them only, so its
  variance is the sum of their squared weights (a row there is wrong at
  exactly one of the two thresholds). With few mislabeled rows the error is
  flat over a wide range of deltas and the exact minimum lands anywhere in it
  by chance; the band takes the middle of that range instead, while a sharp
  optimum (many mislabeled rows) barely moves.

  Args:
    class_ids: int [N], >= 0.
    truth: int or bool [N] in {0, 1}; verification labels.
    scores: float [N], finite.
    candidates: optional float [T] thresholds to try; default
      `default_candidates(scores)`.
    tie_band: z >= 0, see above; 0 keeps exact ties only.

  Returns:
    (delta, average per-class error at delta).

  Raises:
    InputError: on empty or malformed input.
  """
  fn = "select_threshold"
  if not tie_band >= 0:
    raise InputError(f"{fn}: tie_band must be >= 0, got {tie_band}")
  if np.size(class_ids) == 0:
    raise InputError(f"{fn}: no verified rows")
  class_ids, truth, scores = _check_rows(fn, class_ids, truth, scores)
  if candidates is None:
    candidates = default_candidates(scores)
  else:
    candidates = _check_scores(fn, candidates)
    if candidates.ndim != 1 or not candidates.size:
      raise InputError(f"{fn}: candidates must be a non-empty 1-D array, got "
                       f"shape {candidates.shape}")
    candidates = np.unique(candidates.astype(np.float64))

  rows = np.bincount(class_ids)
  weight = 1.0 / (np.count_nonzero(rows) * rows[class_ids])
  order = np.argsort(scores, kind="stable")
  sorted_scores = scores[order]
  # clean_below[j]: weight of clean rows among the j lowest scores;
  # noisy_below[j]: same for mislabeled rows.
  clean_below = np.concatenate(
      [[0.0], np.cumsum(weight[order] * truth[order])])
  noisy_below = np.concatenate(
      [[0.0], np.cumsum(weight[order] * (1 - truth[order]))])
  # Rows with score < t are decided 0: clean ones there and mislabeled ones
  # at or above t are the errors.
  below = np.searchsorted(sorted_scores, candidates, side="left")
  errors = clean_below[below] + (noisy_below[-1] - noisy_below[below])

  best = _median_of_tied(candidates, errors <= errors.min() + _TIE_TOLERANCE)
  if tie_band > 0:
    squares_below = np.concatenate([[0.0], np.cumsum(weight[order] ** 2)])
    spread = np.sqrt(np.abs(squares_below[below] - squares_below[below[best]]))
    best = _median_of_tied(
        candidates, errors <= errors[best] + tie_band * spread + _TIE_TOLERANCE)
  delta = float(candidates[best])
  # Recomputed exactly per class rather than read from the cumulative sums.
  return delta, average_per_class_error(
      class_ids, truth, (scores >= delta).astype(np.int64))


def calibrated_threshold(class_ids, truth, scores) -> tuple[float, float]:
  """One threshold for all classes where the calibrated score crosses 1/2.

  Fits P(label correct | score) = sigmoid(a * score + b) to the verified rows
  by logistic regression, each row weighted 1 / (C * n_c) as in the average
  per-class error, and returns delta = -b / a: the Bayes decision of eq. 11
  for that error under the fit. Every row moves the fit, whereas the minimum
  of the error (``select_threshold``) is decided by the few rows near it: with
  few mislabeled verified rows the minimum lands anywhere in a wide flat range
  from one sample to the next, and the fitted crossing does not.

  Falls back to ``select_threshold`` (exact ties) when the fit cannot say:
  the rows are all clean or all mislabeled, the scores are all equal, or the
  fitted slope is not positive (higher scores not more often clean).

  Args:
    class_ids: int [N], >= 0.
    truth: int or bool [N] in {0, 1}; verification labels.
    scores: float [N], finite.

  Returns:
    (delta, average per-class error at delta on these rows).

  Raises:
    InputError: on empty or malformed input.
  """
  fn = "calibrated_threshold"
  if np.size(class_ids) == 0:
    raise InputError(f"{fn}: no verified rows")
  class_ids, truth, scores = _check_rows(fn, class_ids, truth, scores)
  spread = scores.std()
  if truth.min() == truth.max() or not spread > 0:
    return select_threshold(class_ids, truth, scores)
  rows = np.bincount(class_ids)
  weight = 1.0 / rows[class_ids]
  # Standardised scores keep the solver well conditioned whatever their scale.
  centre = scores.mean()
  fit = LogisticRegression(C=_CALIBRATION_C).fit(
      ((scores - centre) / spread)[:, None], truth, sample_weight=weight / weight.mean())
  slope, intercept = float(fit.coef_[0, 0]), float(fit.intercept_[0])
  if not slope > 0:
    return select_threshold(class_ids, truth, scores)
  delta = float(centre - spread * intercept / slope)
  return delta, average_per_class_error(class_ids, truth, (scores >= delta).astype(np.int64))


def choose_threshold(class_ids, truth, scores, rule="calibrated",
                     tie_band=0.0) -> tuple[float, float]:
  """delta on verified rows by `rule` (one of THRESHOLD_RULES).

  "calibrated": ``calibrated_threshold``. "minimum": ``select_threshold``
  with `tie_band`, which only that rule uses.

  Returns:
    (delta, average per-class error at delta on these rows).
  """
  if rule == "calibrated":
    return calibrated_threshold(class_ids, truth, scores)
  if rule == "minimum":
    return select_threshold(class_ids, truth, scores, tie_band=tie_band)
  raise InputError(f"threshold rule {rule!r}: must be one of {', '.join(THRESHOLD_RULES)}")


def select_threshold_cv(class_ids, truth, scores, folds=5, seed=0, tie_band=0.0,
                        rule="minimum") -> dict:
  """Cross-validated error of a rule that chooses one threshold (``choose_threshold``).

  Each fold's threshold is chosen on the other folds and scored on the fold.
  Folds are stratified by class so that every class is spread over them; when
  some class has fewer rows than `folds`, stratification is impossible and
  plain shuffled K-fold is used instead.

  Args:
    class_ids: int [N], >= 0, N >= folds.
    truth: int or bool [N] in {0, 1}; verification labels.
    scores: float [N], finite.
    folds: number of folds, >= 2.
    seed: seed of the fold shuffling.
    tie_band: ``select_threshold``'s, for every fold and for all rows.
    rule: ``choose_threshold``'s.

  Returns:
    dict with "delta" (float, threshold chosen on all rows, the one to use),
    "cv_avg_class_error" (float, mean of the fold errors), "fold_errors"
    (list of float, average per-class error on each held-out fold) and
    "fold_deltas" (list of float, threshold chosen for each fold).
  """
  fn = "select_threshold_cv"
  if np.size(class_ids) == 0:
    raise InputError(f"{fn}: no verified rows")
  class_ids, truth, scores = _check_rows(fn, class_ids, truth, scores)
  if folds < 2:
    raise InputError(f"{fn}: folds must be >= 2, got {folds}")
  if class_ids.size < folds:
    raise InputError(f"{fn}: {class_ids.size} verified rows, fewer than "
                     f"folds={folds}")
  rows = np.bincount(class_ids)
  if rows[rows > 0].min() >= folds:
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
  else:
    splitter = KFold(n_splits=folds, shuffle=True, random_state=seed)
  fold_errors, fold_deltas = [], []
  for fit, held_out in splitter.split(scores, class_ids):
    delta, _ = choose_threshold(class_ids[fit], truth[fit], scores[fit], rule, tie_band)
    fold_deltas.append(delta)
    fold_errors.append(average_per_class_error(
        class_ids[held_out], truth[held_out],
        (scores[held_out] >= delta).astype(np.int64)))
  delta, _ = choose_threshold(class_ids, truth, scores, rule, tie_band)
  return {
      "delta": delta,
      "cv_avg_class_error": float(np.mean(fold_errors)),
      "fold_errors": fold_errors,
      "fold_deltas": fold_deltas,
  }
