"""Label-noise detection baselines of the paper's Table 2, on image features.

Every method maps a `Problem` (features, noisy class ids, the verified training
rows) to a relevance score per row, higher = the noisy label is more likely
correct. So they all share one evaluation: a threshold chosen by
``detection.select_threshold`` on verified validation rows, then the average
per-class error (paper Sec. 4.2).

Supervised methods learn, as in the paper, one binary classifier per class
from that class's verified rows. A class whose verified training rows carry a
single label (or none) cannot train one; it gets a constant score, the share
of its verified training rows that are clean, and 1.0 (the naive "all clean")
where it has none. ``fallback_classes`` names those classes.

cleanlab is an optional dependency (benchmark only): imported lazily, and
``cleanlab_available()`` says whether it can run.
"""

import dataclasses
import functools
import importlib.util
from typing import Callable

import numpy as np
from sklearn import ensemble, linear_model, model_selection, neighbors, neural_network
from sklearn import preprocessing, semi_supervised, svm


@dataclasses.dataclass(frozen=True)
class Problem:
  """One detection task: every row is scored, only `train` rows are labelled.

  Attributes:
    features: float [N, D] raw image features.
    class_ids: int [N] noisy class of each row, in [0, num_classes).
    train: int [T] indices of the verified training rows.
    train_truth: int [T] their verification labels (1 clean, 0 mislabeled).
    num_classes: L.
    seed: seeds every randomised method.
  """
  features: np.ndarray
  class_ids: np.ndarray
  train: np.ndarray
  train_truth: np.ndarray
  num_classes: int
  seed: int = 0

  def normalized(self) -> np.ndarray:
    """Features as CleanNet's encoders see them (signed log1p), standardised.

    Standardising is unsupervised (statistics of all rows), so it uses no
    label; it puts every dimension on one scale for kNN, SVM and the MLP.
    """
    return preprocessing.StandardScaler().fit_transform(log1p(self.features))


def log1p(features: np.ndarray) -> np.ndarray:
  """The signed log1p normalisation of CleanNet's default (DEFAULTS.md)."""
  features = np.asarray(features, np.float64)
  return np.sign(features) * np.log1p(np.abs(features))


def _train_counts(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
  """(verified training rows, clean ones among them) per class, float [L] each."""
  classes = problem.class_ids[problem.train]
  return (np.bincount(classes, minlength=problem.num_classes).astype(np.float64),
          np.bincount(classes, weights=problem.train_truth, minlength=problem.num_classes))


def class_prior(problem: Problem) -> np.ndarray:
  """float [L]: share of clean verified training rows per class; 1.0 if none."""
  rows, clean = _train_counts(problem)
  return np.divide(clean, rows, out=np.ones(problem.num_classes), where=rows > 0)


def fallback_classes(problem: Problem) -> np.ndarray:
  """Classes a per-class supervised method cannot learn: < 2 distinct labels."""
  rows, clean = _train_counts(problem)
  return np.flatnonzero((clean == 0) | (clean == rows))


def naive(problem: Problem) -> np.ndarray:
  """Every label is taken as correct: one constant score."""
  return np.ones(len(problem.class_ids))


def average_baseline(problem: Problem, reference_features: np.ndarray,
                     reference_counts: np.ndarray) -> np.ndarray:
  """Cosine of each row to the mean of its class's references (log1p space).

  Args:
    problem: the rows to score.
    reference_features: float [L, K, D] padded reference sets.
    reference_counts: int [L] real references per class; padding is skipped.
  """
  references = log1p(reference_features)
  real = np.arange(references.shape[1]) < np.asarray(reference_counts)[:, None]
  means = (references * real[..., None]).sum(1) / np.maximum(real.sum(1), 1)[:, None]
  queries = log1p(problem.features)
  means = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
  queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
  return np.einsum("nd,nd->n", queries, means[problem.class_ids])


# A per-class model: (its class's normalised features, indices of the verified
# training rows among them, their labels, seed) -> P(clean) of every row.
ClassScorer = Callable[[np.ndarray, np.ndarray, np.ndarray, int], np.ndarray]


def per_class(class_scorer: ClassScorer) -> Callable[[Problem], np.ndarray]:
  """Lifts a per-class binary scorer to a method; unlearnable classes fall back."""

  def method(problem: Problem) -> np.ndarray:
    x = problem.normalized()
    scores = class_prior(problem)[problem.class_ids]
    skip = set(fallback_classes(problem).tolist())
    train_class = problem.class_ids[problem.train]
    for c in range(problem.num_classes):
      if c in skip:
        continue
      rows = np.flatnonzero(problem.class_ids == c)
      labelled = problem.train[train_class == c]
      # Positions of the labelled rows within `rows` (both sorted by index).
      local = np.searchsorted(rows, labelled)
      scores[rows] = class_scorer(x[rows], local, problem.train_truth[train_class == c],
                                  problem.seed + c)
    return scores

  return method


def _fit_predict(model, x, labelled, truth):
  model.fit(x[labelled], truth)
  return model.predict_proba(x)[:, list(model.classes_).index(1)]


def _mlp(x, labelled, truth, seed):
  # The paper's 2-layer MLP [37]: one hidden layer, then the output layer.
  return _fit_predict(neural_network.MLPClassifier(
      hidden_layer_sizes=(128,), alpha=1e-3, max_iter=500, random_state=seed),
                      x, labelled, truth)


def _knn(x, labelled, truth, seed):
  del seed  # deterministic
  return _fit_predict(neighbors.KNeighborsClassifier(
      n_neighbors=min(10, len(labelled)), weights="distance"), x, labelled, truth)


def _svm(x, labelled, truth, seed):
  # Platt-scaled probabilities, so that one threshold is meaningful across
  # classes and beside the fallback constants. scikit-learn 1.9 deprecates
  # probability=True for CalibratedClassifierCV(SVC(), ensemble=False), which
  # fits the sigmoid on other folds as libsvm does but moves the SVM rows of
  # BENCHMARKS.md by tenths; kept, with scikit-learn < 1.11 (setup.py), until
  # that file is next regenerated whole.
  return _fit_predict(svm.SVC(probability=True, random_state=seed), x, labelled, truth)


def _semi_supervised(make_model):
  """Label propagation/spreading: transductive over the class's rows.

  The class's unverified rows take part unlabelled (their labels are never
  read), as scikit-learn's semi-supervised estimators intend.
  """

  def scorer(x, labelled, truth, seed):
    del seed  # deterministic
    targets = np.full(len(x), -1)
    targets[labelled] = truth
    model = make_model().fit(x, targets)
    return model.label_distributions_[:, list(model.classes_).index(1)]

  return scorer


def isolation_forest(problem: Problem) -> np.ndarray:
  """Unsupervised outlier score per class (higher = more typical of its class).

  Stands for the paper's unsupervised baseline (DRAE; an outlier detector fit
  on each class's noisy rows, no verification label).
  """
  x = log1p(problem.features)
  scores = np.zeros(len(x))
  for c in np.unique(problem.class_ids):
    rows = problem.class_ids == c
    forest = ensemble.IsolationForest(n_estimators=100, random_state=problem.seed + int(c))
    scores[rows] = forest.fit(x[rows]).score_samples(x[rows])
  return scores


def classification_filtering(problem: Problem, probabilities: np.ndarray) -> np.ndarray:
  """Minus the rank of the noisy label in a classifier's predictions.

  The paper keeps a row when its label is among the top-K predictions of the
  CNN trained on the noisy data; thresholding -rank at -K + 0.5 is exactly
  that rule, so choosing the threshold on verified rows chooses K.

  Args:
    problem: the rows to score.
    probabilities: float [N, L] class probabilities (or logits) per row.
  """
  probabilities = np.asarray(probabilities)
  own = probabilities[np.arange(len(probabilities)), problem.class_ids]
  return -(probabilities > own[:, None]).sum(axis=1).astype(np.float64)


def cross_validated_probabilities(problem: Problem, folds: int = 5) -> np.ndarray:
  """float [N, L]: out-of-fold softmax-regression probabilities of the noisy labels."""
  model = linear_model.LogisticRegression(max_iter=300)
  return model_selection.cross_val_predict(
      model, problem.normalized(), problem.class_ids,
      cv=model_selection.StratifiedKFold(folds, shuffle=True, random_state=problem.seed),
      method="predict_proba")


def cleanlab_available() -> bool:
  return importlib.util.find_spec("cleanlab") is not None


def cleanlab_issues(problem: Problem, probabilities: np.ndarray) -> np.ndarray:
  """cleanlab's ``find_label_issues`` verdict as a score: 1 kept, 0 an issue.

  Args:
    problem: the rows to score.
    probabilities: float [N, L] out-of-fold probabilities (see
      ``cross_validated_probabilities``).
  """
  from cleanlab import filter as cleanlab_filter  # pylint: disable=g-import-not-at-top
  issues = cleanlab_filter.find_label_issues(problem.class_ids, probabilities)
  return (~issues).astype(np.float64)


mlp = per_class(_mlp)
knn = per_class(_knn)
svm_baseline = per_class(_svm)
# A k-NN graph rather than the default dense RBF kernel: a class has thousands
# of rows, and the dense N x N affinity would cost O(N^2) memory per class.
label_propagation = per_class(_semi_supervised(functools.partial(
    semi_supervised.LabelPropagation, kernel="knn", n_neighbors=10, max_iter=200)))
label_spreading = per_class(_semi_supervised(functools.partial(
    semi_supervised.LabelSpreading, kernel="knn", n_neighbors=10, alpha=0.2)))

# The supervised methods by the names the benchmark reports.
SUPERVISED = {"MLP": mlp, "kNN": knn, "SVM": svm_baseline,
              "label propagation": label_propagation, "label spreading": label_spreading}
