"""Which wrong labels CleanNet's weights still draw (CIFAR-10N, a diagnosis).

  python docs/experiments/kept_noise.py \
      --weights=runs/benchmarks/features-worse_label/classification-scratch/weights.npz \
      --manifest=runs/benchmarks/features-worse_label/train.csv \
      --labels=../shared/data/cifar10n/train.csv \
      --out=docs/experiments/kept_noise/worse_label.md

--weights is a classification job's weights (``alternating.save_weights``),
--manifest the feature run's training manifest (its rows in the weights'
order), --labels CIFAR-10N's train.csv, which holds every row's clean label
and each label set. The noisy labels are the manifest's.

A weighted classifier draws row i with probability w_i / max(w). For each
weighting (of each --weights file: a job's weights.npz and, say, its
cleannet-star/weights.npz) it prints:

* the share of wrong labels among the drawn rows and the share of the
  correct rows' draws kept (``detection.drawn_rows``), on all rows, and
  estimated the way a user can, on CleanNet's held-out verified rows (the
  validation rows it did not train on: ``training.split_verified`` of the
  manifest's verified rows with --val_fraction and --split_seed);
* the share of the drawn wrong labels that the annotators' majority gave too
  (`aggre_label` equals the noisy label): images that most people label the
  same wrong way, against that share among all wrong labels;
* per confusion (true class -> noisy label), the share of its rows drawn
  (first --weights file).

It reads clean labels and is never used to choose anything.
"""

import argparse
import collections
import csv
import os
import sys

import numpy as np

from cleannet_tf import detection, training


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--weights", required=True, action="append",
                      help="weights.npz of a classification job (repeat to compare files).")
  parser.add_argument("--manifest", required=True,
                      help="The feature run's train.csv (path,label,...).")
  parser.add_argument("--labels", required=True,
                      help="CIFAR-10N train.csv (path,...,clean_label,aggre_label,...).")
  parser.add_argument("--out", required=True, help="Markdown file to write (printed too).")
  parser.add_argument("--pairs", type=int, default=12,
                      help="How many of the most frequent confusions to list.")
  parser.add_argument("--weightings", default="w_hard,w_soft,w_soft_balanced",
                      help="Comma-separated weightings (keys of --weights) to compare.")
  parser.add_argument("--val_fraction", type=float, default=training.TrainConfig.val_fraction,
                      help="CleanNet's --val_fraction (the share of verified rows held out).")
  parser.add_argument("--split_seed", type=int, default=0,
                      help="CleanNet's validation split seed (its --seed; the benchmark's is 0).")
  return parser.parse_args(argv)


def read_labels(manifest_path, labels_path):
  """(noisy, clean, majority, verification) arrays in the manifest's row order."""
  with open(labels_path, encoding="utf-8", newline="") as f:
    by_path = {row["path"]: (row["clean_label"], row["aggre_label"])
               for row in csv.DictReader(f)}
  # The manifest holds absolute paths; the label file paths relative to its folder.
  root = os.path.dirname(os.path.abspath(labels_path))
  noisy, clean, majority, verification = [], [], [], []
  with open(manifest_path, encoding="utf-8", newline="") as f:
    for line, row in enumerate(csv.DictReader(f), start=2):
      key = os.path.relpath(os.path.abspath(row["path"]), root)
      if key not in by_path:
        sys.exit(f"error: {manifest_path}, line {line}: {row['path']} is not in {labels_path}")
      noisy.append(row["label"])
      clean.append(by_path[key][0])
      majority.append(by_path[key][1])
      verification.append(int(row.get("verification") or -1))
  return np.array(noisy), np.array(clean), np.array(majority), np.array(verification)


def kept_noise(draw, noisy, clean, majority, num_pairs):
  """What the rows drawn with probability `draw` hold among the wrong labels.

  Returns (share of drawn rows whose label is wrong, share of the drawn wrong
  labels the majority gave too (None when none is drawn), {(true, noisy):
  share of that confusion's rows drawn}) for the `num_pairs` most frequent
  confusions.
  """
  wrong = noisy != clean
  shared = wrong & (majority == noisy)
  drawn_wrong = draw[wrong].sum()
  pairs = collections.Counter(zip(clean[wrong], noisy[wrong])).most_common(num_pairs)
  per_pair = {}
  for (true, label), count in pairs:
    rows = wrong & (clean == true) & (noisy == label)
    per_pair[(true, label)] = float(draw[rows].sum() / count)
  return (float(drawn_wrong / draw.sum()),
          float(draw[shared].sum() / drawn_wrong) if drawn_wrong else None, per_pair)


def validation_rows(noisy, verification, val_fraction, split_seed):
  """Bool [N]: the verified rows CleanNet held out (``training.split_verified``)."""
  verified = np.flatnonzero(verification >= 0)
  _, class_ids = np.unique(noisy[verified], return_inverse=True)
  _, held_out = training.split_verified(class_ids, val_fraction, split_seed)
  mask = np.zeros(len(noisy), bool)
  mask[verified[held_out]] = True
  return mask


def report(weights, noisy, clean, majority, verification, validation, weightings, num_pairs):
  """Markdown tables; `weights` is {file label: {weighting: float [N]}}, `validation`
  a bool [N] of the held-out verified rows, whose `verification` labels (not the
  clean labels) give the estimate."""
  wrong = noisy != clean
  share_all = float((majority[wrong] == noisy[wrong]).mean())
  lines = [f"Rows: {len(noisy)}, {wrong.mean():.1%} wrong. Among all wrong labels, "
           f"{share_all:.1%} are the annotators' majority label too. Held-out verified "
           f"rows: {validation.sum()}.", "",
           "| weights | weighting | drawn rows wrong | correct rows kept | estimated on the "
           "held-out verified rows: wrong / kept | drawn wrong labels the majority gave too |",
           "|---|---|---|---|---|---|"]
  per_pair = {}
  for label, arrays in weights.items():
    for name in weightings:
      w = arrays[name]
      drawn_noise, shared, pairs = kept_noise(w / w.max(), noisy, clean, majority, num_pairs)
      per_pair.setdefault(name, pairs)  # the first file's
      drawn = detection.drawn_rows(w, ~wrong)
      estimate = detection.drawn_rows(w[validation], verification[validation])
      lines.append(f"| {label} | {name} | {drawn_noise:.1%} | {drawn['correct_kept']:.1%} | "
                   f"{estimate['drawn_noise_rate']:.1%} / {estimate['correct_kept']:.1%} | "
                   f"{'-' if shared is None else format(shared, '.1%')} |")
  first = next(iter(weights))
  lines += ["", f"Share of each confusion's rows drawn ({first}; true class -> noisy label):",
            "", "| confusion | rows | " + " | ".join(weightings) + " |",
            "|---|---|" + "---|" * len(weightings)]
  counts = collections.Counter(zip(clean[wrong], noisy[wrong]))
  for pair in per_pair[weightings[0]]:
    lines.append(f"| {pair[0]} -> {pair[1]} | {counts[pair]} | "
                 + " | ".join(f"{per_pair[name][pair]:.2f}" for name in weightings) + " |")
  return "\n".join(lines) + "\n"


def _file_label(path):
  """A weights file's name in the table: the folder that holds it."""
  return os.path.basename(os.path.dirname(os.path.abspath(path)))


def main(argv):
  args = parse_args(argv)
  weightings = args.weightings.split(",")
  noisy, clean, majority, verification = read_labels(args.manifest, args.labels)
  weights = {}
  for path in args.weights:
    with np.load(path) as saved:
      missing = [name for name in weightings if name not in saved.files]
      if missing:
        sys.exit(f"error: {path}: no {', '.join(missing)} (--weightings)")
      weights[_file_label(path)] = {name: saved[name] for name in weightings}
    if any(len(w) != len(noisy) for w in weights[_file_label(path)].values()):
      sys.exit(f"error: {path}: not one weight per row of {args.manifest}")
  validation = validation_rows(noisy, verification, args.val_fraction, args.split_seed)
  text = report(weights, noisy, clean, majority, verification, validation, weightings,
                args.pairs)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out + ".tmp", "w", encoding="utf-8") as f:
    f.write(f"Command: `python docs/experiments/kept_noise.py {' '.join(argv)}`\n\n" + text)
  os.replace(args.out + ".tmp", args.out)
  print(text)


if __name__ == "__main__":
  main(sys.argv[1:])
