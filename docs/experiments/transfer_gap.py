"""Where CleanNet loses in transfer: ranking or threshold, per held-out class.

  python docs/experiments/transfer_gap.py \
      --run_dir=runs/benchmarks/features-worse_label \
      --out=runs/benchmarks/detection-worse_label \
      --clean_labels=../shared/data/cifar10n/train.csv [--variants=cleannet,...]

The flags are ``tools.benchmark_detection``'s (the same --run_dir, --out and
--seed as the benchmark run whose transfer models are read; --ablation_transfer_n
says which transfer_n<n>_split<s> folders). For each model folder named in
--variants under each split it prints two tables:

* per held-out class, on its evaluation rows (clean labels: a diagnosis,
  never a choice): the ROC AUC of the score (ranking), the error at the
  shared delta, the lowest error any threshold of that class's own would give
  (an oracle), and the share of rows the shared delta flags beside the
  class's noise rate. A class with a high AUC and an oracle error far below
  its error at delta loses to the threshold, not to the ranking. Beside
  delta, the mean score of the class's correct and of its mislabelled rows,
  and the mislabelled rows' mean cosine with their true class's embedding:
  where that is not far above their score, the query encoder has not told
  the two classes' images apart.
* per split, on the same rows: the error at the shared delta beside the
  lowest error of any one shared delta and of a threshold per class (both
  oracles). When the first oracle is close to the error at delta and the
  second far below it, no choice of the one delta helps: the classes need
  different thresholds.
* two ways to score or threshold the held-out classes without their labels,
  on what a choice may be based on (the held-out classes' verified rows, which
  neither training nor the threshold saw) and, reported only, on their
  evaluation rows: the margin score s(q, y) - lambda * max_{c != y} s(q, c)
  (the row's cosine with its own class embedding against its best other
  class; lambda = 0 is CleanNet's score) with delta by the calibrated rule,
  and per-class thresholds where a 2-component Gaussian mixture of the
  class's scores crosses 1/2.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from sklearn.mixture import GaussianMixture  # noqa: E402

from cleannet_tf import detection  # noqa: E402
from tools import benchmark_detection as bench  # noqa: E402
from tools import common  # noqa: E402

flags.DEFINE_list("variants", ["cleannet"],
                  "Model folders (under each transfer split folder) to diagnose.")
FLAGS = flags.FLAGS

MARGIN_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def class_similarities(model_dir, features, batch_size=8192):
  """float [N, L]: cosine of every row's query embedding with every class embedding."""
  model = common.load_keras(os.path.join(model_dir, "model.keras"), "a CleanNet")
  classes = model.class_embeddings()[0].numpy()
  classes /= np.linalg.norm(classes, axis=1, keepdims=True)
  queries = np.concatenate([model.query_embeddings(features[start:start + batch_size]).numpy()
                            for start in range(0, len(features), batch_size)])
  queries /= np.linalg.norm(queries, axis=1, keepdims=True) + 1e-12
  return queries @ classes.T


def margin_scores(similarities, class_ids, weight):
  """float [N]: own-class cosine minus `weight` x the best other class's."""
  rows = np.arange(len(class_ids))
  own = similarities[rows, class_ids]
  others = similarities.copy()
  others[rows, class_ids] = -np.inf
  return own - weight * others.max(axis=1)


def mixture_threshold(scores, fallback):
  """Where a 2-component Gaussian mixture of `scores` gives the upper one 1/2."""
  mixture = GaussianMixture(2, random_state=0).fit(scores[:, None])
  low, high = np.argsort(mixture.means_[:, 0])
  grid = np.linspace(mixture.means_[low, 0], mixture.means_[high, 0], 400)
  upper = np.flatnonzero(mixture.predict_proba(grid[:, None])[:, high] >= 0.5)
  return grid[upper[0]] if len(upper) else fallback


def lowest_class_error(scores, truth):
  """The lowest error of one class's rows over thresholds at its score quantiles."""
  return min(np.mean((scores >= q) != truth.astype(bool))
             for q in np.quantile(scores, np.linspace(0, 1, 201)))


def main(_):
  out = FLAGS.out
  info, rows, truth = bench.rows_with_truth(os.path.join(FLAGS.run_dir, "features", "all"),
                                            FLAGS.clean_labels)
  class_ids, verification, features = rows["class_id"], rows["verification"], rows["features"]
  true_ids = bench.clean_class_ids(FLAGS.clean_labels, info.class_names, rows["key"].astype(str))
  n = FLAGS.ablation_transfer_n
  per_class, per_split, alternatives = [], [], {}
  for variant in FLAGS.variants:
    for split in range(FLAGS.transfer_splits):
      held_out, masked, evaluated, val, _ = bench.held_out_split(rows, n, split, info, out)
      held_out_verified = np.isin(class_ids, held_out) & (verification >= 0)
      similarities = class_similarities(
          os.path.join(out, f"transfer_n{n}_split{split}", variant), features)

      def errors(scores, thresholds):
        decisions = (scores >= thresholds[class_ids]).astype(np.int64)
        return [detection.average_per_class_error(class_ids[m], labels[m], decisions[m])
                for m, labels in ((held_out_verified, verification), (evaluated, truth))]

      for weight in MARGIN_WEIGHTS:
        scores = margin_scores(similarities, class_ids, weight)
        delta, _ = detection.choose_threshold(class_ids[val], masked[val], scores[val],
                                              "calibrated", 0.0)
        shared = np.full(info.num_classes, delta)
        alternatives.setdefault(f"margin, lambda {weight}", []).append(errors(scores, shared))
        if weight:
          continue
        mixture = shared.copy()
        for c in held_out:
          mixture[c] = mixture_threshold(scores[class_ids == c], delta)
        alternatives.setdefault("Gaussian-mixture threshold per held-out class",
                                []).append(errors(scores, mixture))
        _, best_shared = detection.select_threshold(class_ids[evaluated], truth[evaluated],
                                                    scores[evaluated])
        per_split.append((variant, split, ", ".join(info.class_names[c] for c in held_out),
                          delta, errors(scores, shared)[1], best_shared,
                          np.mean([lowest_class_error(scores[evaluated & (class_ids == c)],
                                                      truth[evaluated & (class_ids == c)])
                                   for c in held_out])))
        for c in held_out:
          rows_c = evaluated & (class_ids == c)
          s, t = scores[rows_c], truth[rows_c]
          wrong = rows_c & (truth == 0)
          per_class.append((variant, split, info.class_names[c], roc_auc_score(t, s),
                            np.mean((s >= delta) != t.astype(bool)),
                            lowest_class_error(s, t), np.mean(s < delta), 1 - t.mean(),
                            delta, s[t == 1].mean(), s[t == 0].mean(),
                            similarities[wrong, true_ids[wrong]].mean()))
  print(f"Held-out classes of the transfer models in {out} (n={n}; evaluation rows, "
        "a diagnosis)\n")
  print("| model | split | class | AUC | error at delta | lowest error, own threshold "
        "| flagged | noise rate | delta | score: correct rows | score: mislabelled rows "
        "| mislabelled rows: cosine with true class |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
  for (variant, split, name, auc, error, lowest, flagged, noise, delta, correct_score,
       wrong_score, true_class_cosine) in per_class:
    print(f"| {variant} | {split} | {name} | {auc:.3f} | {100 * error:.1f}% | "
          f"{100 * lowest:.1f}% | {100 * flagged:.0f}% | {100 * noise:.0f}% | {delta:.3f} | "
          f"{correct_score:.3f} | {wrong_score:.3f} | {true_class_cosine:.3f} |")
  print("\n| model | split | held-out classes | delta | error at delta | lowest error, one "
        "shared delta | lowest error, a threshold per class |\n|---|---|---|---|---|---|---|")
  for variant, split, names, delta, error, best_shared, best_per_class in per_split:
    print(f"| {variant} | {split} | {names} | {delta:.3f} | {100 * error:.2f}% | "
          f"{100 * best_shared:.2f}% | {100 * best_per_class:.2f}% |")
  print("\n| scoring or threshold | held-out classes' verified rows | their evaluation rows "
        "|\n|---|---|---|")
  for name, values in alternatives.items():
    verified_error, evaluation_error = 100 * np.mean(values, axis=0)
    print(f"| {name} | {verified_error:.2f}% | {evaluation_error:.2f}% |")


if __name__ == "__main__":
  app.run(main)
