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
weighting it prints what the drawn wrong labels are made of:

* the share of them that the annotators' majority gave too (`aggre_label`
  equals the noisy label): images that most people label the same wrong way,
  against that share among all wrong labels;
* per confusion (true class -> noisy label), the share of its rows drawn.

It reads clean labels and is never used to choose anything.
"""

import argparse
import collections
import csv
import os
import sys

import numpy as np


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--weights", required=True, help="weights.npz of a classification job.")
  parser.add_argument("--manifest", required=True,
                      help="The feature run's train.csv (path,label,...).")
  parser.add_argument("--labels", required=True,
                      help="CIFAR-10N train.csv (path,...,clean_label,aggre_label,...).")
  parser.add_argument("--out", required=True, help="Markdown file to write (printed too).")
  parser.add_argument("--pairs", type=int, default=12,
                      help="How many of the most frequent confusions to list.")
  parser.add_argument("--weightings", default="w_hard,w_soft,w_soft_balanced",
                      help="Comma-separated weightings (keys of --weights) to compare.")
  return parser.parse_args(argv)


def read_labels(manifest_path, labels_path):
  """(noisy, clean, majority) label arrays in the manifest's row order."""
  with open(labels_path, encoding="utf-8", newline="") as f:
    by_path = {row["path"]: (row["clean_label"], row["aggre_label"])
               for row in csv.DictReader(f)}
  # The manifest holds absolute paths; the label file paths relative to its folder.
  root = os.path.dirname(os.path.abspath(labels_path))
  noisy, clean, majority = [], [], []
  with open(manifest_path, encoding="utf-8", newline="") as f:
    for line, row in enumerate(csv.DictReader(f), start=2):
      key = os.path.relpath(os.path.abspath(row["path"]), root)
      if key not in by_path:
        sys.exit(f"error: {manifest_path}, line {line}: {row['path']} is not in {labels_path}")
      noisy.append(row["label"])
      clean.append(by_path[key][0])
      majority.append(by_path[key][1])
  return np.array(noisy), np.array(clean), np.array(majority)


def kept_noise(draw, noisy, clean, majority, num_pairs):
  """What the rows drawn with probability `draw` hold among the wrong labels.

  Returns (share of drawn rows whose label is wrong, share of the drawn wrong
  labels the majority gave too, {(true, noisy): share of that confusion's
  rows drawn}) for the `num_pairs` most frequent confusions.
  """
  wrong = noisy != clean
  shared = wrong & (majority == noisy)
  drawn_wrong = draw[wrong].sum()
  pairs = collections.Counter(zip(clean[wrong], noisy[wrong])).most_common(num_pairs)
  per_pair = {}
  for (true, label), count in pairs:
    rows = wrong & (clean == true) & (noisy == label)
    per_pair[(true, label)] = float(draw[rows].sum() / count)
  return (float(drawn_wrong / draw.sum()), float(draw[shared].sum() / drawn_wrong),
          per_pair)


def report(weights, noisy, clean, majority, weightings, num_pairs):
  wrong = noisy != clean
  share_all = float((majority[wrong] == noisy[wrong]).mean())
  lines = [f"Rows: {len(noisy)}, {wrong.mean():.1%} wrong. Among all wrong labels, "
           f"{share_all:.1%} are the annotators' majority label too.", "",
           "| weighting | drawn rows wrong | drawn wrong labels the majority gave too |",
           "|---|---|---|"]
  per_pair = {}
  for name in weightings:
    w = weights[name]
    drawn_noise, shared, per_pair[name] = kept_noise(w / w.max(), noisy, clean, majority,
                                                     num_pairs)
    lines.append(f"| {name} | {drawn_noise:.1%} | {shared:.1%} |")
  lines += ["", "Share of each confusion's rows drawn (true class -> noisy label):", "",
            "| confusion | rows | " + " | ".join(weightings) + " |",
            "|---|---|" + "---|" * len(weightings)]
  counts = collections.Counter(zip(clean[wrong], noisy[wrong]))
  for pair in per_pair[weightings[0]]:
    lines.append(f"| {pair[0]} -> {pair[1]} | {counts[pair]} | "
                 + " | ".join(f"{per_pair[name][pair]:.2f}" for name in weightings) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  args = parse_args(argv)
  weightings = args.weightings.split(",")
  noisy, clean, majority = read_labels(args.manifest, args.labels)
  with np.load(args.weights) as saved:
    missing = [name for name in weightings if name not in saved.files]
    if missing:
      sys.exit(f"error: {args.weights}: no {', '.join(missing)} (--weightings)")
    weights = {name: saved[name] for name in weightings}
  if any(len(w) != len(noisy) for w in weights.values()):
    sys.exit(f"error: {args.weights}: not one weight per row of {args.manifest}")
  text = report(weights, noisy, clean, majority, weightings, args.pairs)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out + ".tmp", "w", encoding="utf-8") as f:
    f.write(f"Command: `python docs/experiments/kept_noise.py {' '.join(argv)}`\n\n" + text)
  os.replace(args.out + ".tmp", args.out)
  print(text)


if __name__ == "__main__":
  main(sys.argv[1:])
