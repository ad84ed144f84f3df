"""The ceiling of any per-row weighting (CIFAR-10N, a diagnosis).

  python docs/experiments/oracle_weighting.py \
      --data=../shared/data/cifar10n --out=runs/benchmarks/features-worse_label \
      --report=docs/experiments/oracle_weighting/worse_label.md

Trains the from-scratch classifier of ``classification-scratch`` (step 1's
recipe and seed, rows drawn with probability w / max(w)) with the weights a
perfect detector would give: 1 on every row whose noisy label is correct, 0
on every wrong one. It has every correct row CleanNet's weights could keep
and none of the wrong ones, so no weighting (w_soft, w_hard, balanced or
not) can draw a better set of rows; its test top-1 is the most the
weighting scheme of Sec. 3.3 can recover of the gap between the noisy and
the clean labels. ``--keep_share`` below 1 keeps a random share of the
correct rows instead (seeded): the cost of losing correct rows without
drawing any wrong one.

--out is a tools.cifar10n_features run whose ``classification-scratch`` job
has finished its clean variant (the reference). The network trains in
<out>/oracle-scratch/correct-<share> and resumes there after a kill. It
reads clean labels and is never used to choose anything.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from cleannet_tf import classifier  # noqa: E402  (after the path above)
from cleannet_tf import data  # noqa: E402
from cleannet_tf import images  # noqa: E402


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--data", required=True, help="The CIFAR-10N folder.")
  parser.add_argument("--out", required=True,
                      help="A tools.cifar10n_features run (with classification-scratch).")
  parser.add_argument("--report", required=True, help="Markdown file to write (printed too).")
  parser.add_argument("--keep_share", type=float, default=1.0,
                      help="Share of the correct rows kept, in (0, 1].")
  parser.add_argument("--seed", type=int, default=0,
                      help="Seed of the kept share (the network uses step 1's).")
  return parser.parse_args(argv)


def oracle_weights(truth, keep_share, seed):
  """float32 [N]: 1 on a `keep_share` of the correct rows (truth 1), else 0."""
  weights = truth.astype(np.float32)
  if keep_share < 1:
    correct = np.flatnonzero(truth == 1)
    dropped = np.random.default_rng(seed).permutation(correct)[
        int(round(keep_share * len(correct))):]
    weights[dropped] = 0
  return weights


def read_json(path):
  if not os.path.exists(path):
    sys.exit(f"error: {path}: missing; run the benchmark's classification-scratch job first")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def main(argv):
  # Imported here, not at the top: the tool defines absl flags (--out among
  # them) that clash with other tools' when a test process loads this file.
  from tools import cifar10n_classification  # pylint: disable=import-outside-toplevel
  args = parse_args(argv)
  if not 0 < args.keep_share <= 1:
    sys.exit(f"error: --keep_share={args.keep_share}: not in (0, 1]")
  class_names = data.read_class_names(os.path.join(args.out, "classes.txt"))
  train = images.read_manifest(os.path.join(args.out, "train.csv"), class_names)
  test = images.read_manifest(os.path.join(args.out, "test.csv"), class_names)
  clean_ids = cifar10n_classification.clean_class_ids(args.data, train, class_names)
  truth = (train.class_ids == clean_ids).astype(np.int64)
  step1 = read_json(os.path.join(args.out, "step1", "summary.json"))
  clean = read_json(os.path.join(args.out, "classification-scratch", "finetune-clean",
                                 "summary.json"))
  config = classifier.ClassifierConfig(**{
      **step1["config"], "image_size": tuple(step1["config"]["image_size"])})
  weights = oracle_weights(truth, args.keep_share, args.seed)
  directory = os.path.join(args.out, "oracle-scratch", f"correct-{args.keep_share:g}")
  summary_path = os.path.join(directory, "summary.json")
  if not os.path.exists(summary_path):
    classifier.ClassifierTrainer(train, directory, config, sample_weights=weights).train(test)
  top1 = read_json(summary_path)["test_top1"]
  none, best = step1["test_top1"], clean["test_top1"]
  text = (f"Rows drawn: {int(weights.sum())} of {len(weights)}, all with correct labels "
          f"({weights.sum() / truth.sum():.0%} of the correct rows).\n\n"
          "| training labels | test top-1 | share of the gap |\n|---|---|---|\n"
          f"| noisy, unweighted (step 1) | {none:.2%} | 0% |\n"
          f"| noisy, correct rows only (keep share {args.keep_share:g}) | {top1:.2%} | "
          f"{(top1 - none) / (best - none):.0%} |\n"
          f"| clean | {best:.2%} | 100% |\n")
  print(text)
  os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
  with open(args.report + ".tmp", "w", encoding="utf-8") as f:
    f.write(f"Command: `python docs/experiments/oracle_weighting.py {' '.join(argv)}`\n\n"
            + text)
  os.replace(args.report + ".tmp", args.report)


if __name__ == "__main__":
  main(sys.argv[1:])
