"""Evaluating detection against ground truth (demo and benchmarks only).

Where clean labels are known, every (image, noisy label) pair has a true
verification label. These helpers report the paper's average per-class error
of CleanNet's decisions beside the naive baseline (all labels kept), split
into classes that had verification labels for training and classes that did
not (the transfer setting, Sec. 4.2).
"""

import numpy as np

from cleannet_tf import detection


def naive_and_cleannet_errors(class_ids, truth, scores, delta, verified_classes):
  """Average per-class error of naive and CleanNet, per group of classes.

  Args:
    class_ids: int [N], noisy class of each evaluated row.
    truth: int [N], 1 where the noisy label is correct, else 0.
    scores: float [N], CleanNet scores.
    delta: the threshold, or one per row (``scoring.class_thresholds`` taken at
      each row's class).
    verified_classes: int [V], classes that had verification labels in training.

  Returns:
    {group: {"rows": n, "naive": err, "cleannet": err}} for the groups
    "verified classes", "unverified classes" and "all classes" that have rows.
  """
  class_ids, truth, scores = (np.asarray(a) for a in (class_ids, truth, scores))
  in_verified = np.isin(class_ids, verified_classes)
  groups = {"verified classes": in_verified, "unverified classes": ~in_verified,
            "all classes": np.ones_like(in_verified)}
  decided = detection.decisions(scores, delta)
  report = {}
  for name, rows in groups.items():
    if not rows.any():
      continue
    report[name] = {
        "rows": int(rows.sum()),
        "naive": detection.average_per_class_error(
            class_ids[rows], truth[rows], np.ones(int(rows.sum()), np.int64)),
        "cleannet": detection.average_per_class_error(
            class_ids[rows], truth[rows], decided[rows]),
    }
  return report
