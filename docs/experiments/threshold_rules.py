"""Compares the threshold rules on a detection benchmark's trained CleanNets.

  python docs/experiments/threshold_rules.py \
      --run_dir=runs/benchmarks/features-aggre_label \
      --out=runs/benchmarks/detection-aggre_label \
      --clean_labels=../shared/data/cifar10n/train.csv [--outer_folds=5]

The flags are ``tools.benchmark_detection``'s (the same --run_dir, --out and
--seed as the benchmark run whose models are compared). Training does not
depend on the rule, so every model the benchmark trained serves each rule:
delta is chosen on the run's verified validation rows by "calibrated"
(``detection.calibrated_threshold``), "minimum" (the lowest validation error,
with the tie band where some classes have no validation rows) and "exact
minimum" (no band), and then scored on:

* transfer models (every transfer_n*_split*/cleannet* folder): the held-out
  classes' verified rows, which neither training nor the threshold saw (what
  the rule may be chosen on), and their evaluation rows;
* full-supervision models (every cleannet* folder): the evaluation rows only,
  since every verified row there trained the model or chose its step;
* with --outer_folds=k, k more CleanNets (defaults, in <out>/threshold_rules/)
  each trained with one fold of the verified rows hidden: those hidden
  verified rows, and the evaluation rows.

Evaluation rows and clean labels are reported, never used to choose.
Prints one markdown table.
"""

import glob
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.model_selection import StratifiedKFold  # noqa: E402

from cleannet_tf import data, detection, references, scoring  # noqa: E402
from tools import benchmark_detection as bench  # noqa: E402
from tools import common  # noqa: E402

flags.DEFINE_integer("outer_folds", 0,
                     "Also train this many CleanNets, each with one fold of the verified "
                     "rows hidden (0: none).")
FLAGS = flags.FLAGS

# name -> (threshold_rule, tie band where some classes have no validation rows).
RULES = {"calibrated": ("calibrated", 0.0),
         "minimum": ("minimum", detection.TRANSFER_TIE_BAND),
         "exact minimum": ("minimum", 0.0)}


def errors_by_rule(scores, class_ids, labels, val, scored):
  """{rule: [average per-class error on each (rows, truth) of `scored`]}.

  delta is chosen on the rows `val` with their `labels` (verification labels).
  """
  result = {}
  for name, (rule, band) in RULES.items():
    tie_band = detection.transfer_tie_band(class_ids[val], np.concatenate(
        [class_ids[rows] for rows, _ in scored]), band)
    delta, _ = detection.choose_threshold(class_ids[val], labels[val], scores[val], rule,
                                          tie_band)
    result[name] = [detection.average_per_class_error(
        class_ids[rows], truth[rows], detection.decisions(scores[rows], delta))
        for rows, truth in scored]
  return result


def saved_scores(model_dir, features, class_ids):
  model = common.load_keras(os.path.join(model_dir, "model.keras"), "a CleanNet")
  return scoring.Scorer(model).score(features, class_ids).astype(np.float64)


def collect(table, key, errors):
  for name, values in errors.items():
    table.setdefault(key, {}).setdefault(name, []).append(values)


def main(_):
  out = FLAGS.out
  info, rows, truth = bench.rows_with_truth(os.path.join(FLAGS.run_dir, "features", "all"),
                                            FLAGS.clean_labels)
  class_ids, verification, features = rows["class_id"], rows["verification"], rows["features"]
  evaluated = verification < 0
  table = {}
  for model_dir in sorted(glob.glob(os.path.join(out, "transfer_n*_split*", "cleannet*"))):
    n, split = map(int, re.search(r"transfer_n(\d+)_split(\d+)", model_dir).groups())
    held_out, masked, held_out_evaluated, val, _ = bench.held_out_split(rows, n, split, info,
                                                                        out)
    held_out_verified = np.isin(class_ids, held_out) & (verification >= 0)
    collect(table, "transfer", errors_by_rule(
        saved_scores(model_dir, features, class_ids), class_ids, masked, val,
        [(held_out_verified, verification), (held_out_evaluated, truth)]))
  _, val = bench.verified_split(verification, class_ids, FLAGS.seed)
  for model_dir in sorted(glob.glob(os.path.join(out, "cleannet*"))):
    collect(table, "full supervision", errors_by_rule(
        saved_scores(model_dir, features, class_ids), class_ids, verification, val,
        [(evaluated, truth)]))
  if FLAGS.outer_folds:
    reference_sets = references.ReferenceSets.load(os.path.join(FLAGS.run_dir,
                                                                "references.npz"))
    verified = np.flatnonzero(verification >= 0)
    folds = StratifiedKFold(FLAGS.outer_folds, shuffle=True, random_state=FLAGS.seed)
    for fold, (_, hidden) in enumerate(folds.split(verified, class_ids[verified])):
      hidden = np.isin(np.arange(len(class_ids)), verified[hidden])
      masked = np.where(hidden, -1, verification)
      directory = os.path.join(out, "threshold_rules", f"fold{fold}")
      features_dir = os.path.join(directory, "features")
      if os.path.exists(os.path.join(features_dir, data.METADATA_FILE)):
        fold_info = data.read_info(features_dir)
      else:
        fold_info = data.write_features(features_dir, rows["key"], features, class_ids,
                                        masked, info.class_names)
      scores = bench.cleannet_scores(fold_info, reference_sets,
                                     os.path.join(directory, "cleannet"), features, class_ids)
      _, fold_val = bench.verified_split(masked, class_ids, FLAGS.seed)
      collect(table, "hidden verified folds", errors_by_rule(
          scores, class_ids, masked, fold_val, [(hidden, verification), (evaluated, truth)]))
  columns = {"transfer": ["held-out classes' verified rows", "their evaluation rows"],
             "full supervision": ["evaluation rows"],
             "hidden verified folds": ["hidden verified rows", "evaluation rows"]}
  print(f"Threshold rules on the CleanNets of {out} (mean average per-class error; "
        "verified-rows columns are what a rule may be chosen on)\n")
  print("| models (runs) | rule | mean error |\n|---|---|---|")
  for key, by_rule in table.items():
    for name, values in by_rule.items():
      means = np.mean(np.array(values), axis=0)
      cells = ", ".join(f"{column} {100 * mean:.2f}%" for column, mean in
                        zip(columns[key], means))
      print(f"| {key} ({len(values)}) | {name} | {cells} |")


if __name__ == "__main__":
  app.run(main)
