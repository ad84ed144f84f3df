"""Writes CIFAR-10N manifests with noisy labels and a few verification labels.

  python -m tools.prepare_cifar10n --data=/path/to/cifar10n --out=runs/cifar10n

Reads the folder's train.csv (path, index, clean_label, aggre_label,
worse_label), test.csv (path, label) and classes.txt, and writes to --out:

* train.csv: path (absolute), label = --label_column (the noisy label),
  verification: for --verified_per_class rows of each noisy class, drawn with
  --seed, 1 where the noisy label equals clean_label else 0; -1 elsewhere.
  The clean labels are used for those rows only.
* test.csv: path (absolute), label (the true class), for step-1 top-1.
* classes.txt.
"""

import csv
import json
import os

from absl import flags
import numpy as np

from tools import common
from cleannet_tf import data
from cleannet_tf.errors import InputError

flags.DEFINE_string("data", None, "CIFAR-10N folder (train.csv, test.csv, classes.txt).")
flags.DEFINE_string("out", None, "Output folder for the manifests.")
flags.DEFINE_enum("label_column", "worse_label", ["worse_label", "aggre_label"],
                  "Which CIFAR-10N annotation is the noisy label.")
flags.DEFINE_integer("verified_per_class", 250, "Verified rows per noisy class.")
flags.DEFINE_integer("seed", 0, "Seed for choosing the verified rows.")
flags.mark_flags_as_required(["data", "out"])
FLAGS = flags.FLAGS


def _read_columns(path):
  try:
    with open(path, newline="", encoding="utf-8") as f:
      rows = list(csv.reader(f))
  except OSError as e:
    raise InputError(f"{path}: cannot read ({e.strerror})") from e
  header, body = rows[0], np.array(rows[1:], dtype=str)
  return {name: body[:, i] for i, name in enumerate(header)}


def _write_csv(path, columns):
  names = list(columns)
  lines = [",".join(names)]
  lines += [",".join(row) for row in zip(*(columns[n].astype(str) for n in names))]
  temporary = path + ".tmp"
  with open(temporary, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(temporary, path)


MANIFESTS_RECORD = "manifests.json"


def prepare(data_dir, out_dir, label_column="worse_label", verified_per_class=250,
            seed=0):
  """Writes the manifests; returns {"train", "test", "classes"} paths and stats."""
  data_dir = os.path.abspath(data_dir)
  class_names = data.read_class_names(os.path.join(data_dir, "classes.txt"))
  train = _read_columns(os.path.join(data_dir, "train.csv"))
  test = _read_columns(os.path.join(data_dir, "test.csv"))
  noisy, clean = train[label_column], train["clean_label"]
  rng = np.random.default_rng(seed)
  verification = np.full(len(noisy), -1, np.int64)
  for name in class_names:  # 10 classes: the loop is over classes, not rows
    rows = np.flatnonzero(noisy == name)
    chosen = rng.choice(rows, size=min(verified_per_class, len(rows)), replace=False)
    verification[chosen] = (noisy[chosen] == clean[chosen]).astype(np.int64)
  os.makedirs(out_dir, exist_ok=True)
  paths = {"train": os.path.join(out_dir, "train.csv"),
           "test": os.path.join(out_dir, "test.csv"),
           "classes": os.path.join(out_dir, "classes.txt")}
  prefix = data_dir + os.sep
  _write_csv(paths["train"], {"path": np.char.add(prefix, train["path"]),
                              "label": noisy, "verification": verification})
  _write_csv(paths["test"], {"path": np.char.add(prefix, test["path"]),
                             "label": test["label"]})
  data.write_class_names(paths["classes"], class_names)
  verified = verification >= 0
  record = {**paths, "label_column": label_column, "seed": seed,
            "verified_per_class": verified_per_class, "train_rows": int(len(noisy)),
            "noise_rate": float(np.mean(noisy != clean)),
            "verified_rows": int(verified.sum()),
            "verified_correct": int((verification == 1).sum())}
  # Downstream tools (the detection benchmark) read which labels these are.
  data.atomic_write_text(os.path.join(out_dir, MANIFESTS_RECORD),
                         json.dumps(record, indent=2) + "\n")
  return record


def main(_):
  print(json.dumps(prepare(FLAGS.data, FLAGS.out, FLAGS.label_column,
                           FLAGS.verified_per_class, FLAGS.seed), indent=2))


def run():
  common.run(main)


if __name__ == "__main__":
  run()
