"""CIFAR-10N top-1 with CleanNet's sample weights (Table 3's comparison).

  python -m tools.cifar10n_features --data=/path/to/cifar10n --out=runs/cifar10n
  python -m tools.cifar10n_classification --data=/path/to/cifar10n --out=runs/cifar10n

Starting from the step-1 classifier, CIFAR-10N features and reference sets
that tools.cifar10n_features left in --out, this trains CleanNet (step 2),
scores every training image (step 3's weights), then fine-tunes the step-1
classifier four times with the same budget (--finetune_steps at
--finetune_learning_rate, same seed and batches):

* none: noisy labels, all weights 1 (more step-1 training);
* w_hard / w_soft: noisy labels weighted by CleanNet (Eq. 12-14);
* clean: the true CIFAR-10 labels, weights 1 (the upper bound).

Each variant's test top-1 is written to <out>/classification/results.json
and results.md. Every stage resumes or is skipped when a previous run
finished it.
"""

import csv
import dataclasses
import json
import os

from absl import flags
import numpy as np

from tools import common, prepare_cifar10n  # pylint: disable=unused-import (its flags)
from cleannet_tf import (alternating, classifier, data, detection, images, training)
from cleannet_tf.errors import InputError

flags.DEFINE_integer("finetune_steps", 1000, "Fine-tuning steps of every variant.")
flags.DEFINE_float("finetune_learning_rate", 0.01,
                   "Fine-tuning initial learning rate (cosine decay).")
flags.DEFINE_integer("finetune_batch_size", 128, "Fine-tuning batch size.")
flags.DEFINE_integer("cleannet_steps", 10_000, "CleanNet training steps.")
flags.DEFINE_float("cleannet_learning_rate", 0.01, "CleanNet learning rate.")
FLAGS = flags.FLAGS

VARIANTS = ("none", "w_hard", "w_soft", "clean")


def _clean_class_ids(data_dir, train, class_names):
  """The true labels of the manifest's rows, int64 [N] (same row order)."""
  with open(os.path.join(data_dir, "train.csv"), newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  paths = np.array([os.path.join(os.path.abspath(data_dir), row["path"]) for row in rows],
                   dtype=train.paths.dtype)
  if len(paths) != train.num_rows or not np.all(paths == train.paths):
    raise InputError(f"{train.description}: rows differ from {data_dir}/train.csv; "
                     "rerun tools.cifar10n_features with this --data")
  ids = {name: i for i, name in enumerate(class_names)}
  return np.array([ids[row["clean_label"]] for row in rows], np.int64)


def _markdown(results):
  lines = ["| training labels | weights | test top-1 |", "|---|---|---|"]
  names = {"step1": ("noisy (step 1 only)", "1"), "none": ("noisy", "1"),
           "w_hard": ("noisy", "w_hard (Eq. 13)"), "w_soft": ("noisy", "w_soft (Eq. 12)"),
           "clean": ("clean", "1")}
  for name, (labels, weights) in names.items():
    lines.append(f"| {labels} | {weights} | {results['top1'][name]:.4f} |")
  return "\n".join(lines) + "\n"


def main(_):
  out = FLAGS.out
  work = os.path.join(out, "classification")
  step1_dir = os.path.join(out, "step1")
  needed = [os.path.join(step1_dir, alternating.SUMMARY_FILE),
            os.path.join(out, "features", "all", data.METADATA_FILE),
            os.path.join(out, "references.npz")]
  missing = [path for path in needed if not os.path.exists(path)]
  if missing:
    raise InputError(f"{missing[0]}: missing; run tools.cifar10n_features "
                     f"--data={FLAGS.data} --out={out} first")
  class_names = data.read_class_names(os.path.join(out, "classes.txt"))
  train = images.read_manifest(os.path.join(out, "train.csv"), class_names)
  test = images.read_manifest(os.path.join(out, "test.csv"), class_names)
  clean_ids = _clean_class_ids(FLAGS.data, train, class_names)
  info = data.read_info(os.path.join(out, "features", "all"))
  steps = FLAGS.cleannet_steps
  config = alternating.AlternatingConfig(
      finetune=classifier.ClassifierConfig(
          image_size=(32, 32), steps=FLAGS.finetune_steps,
          global_batch_size=FLAGS.finetune_batch_size,
          learning_rate=FLAGS.finetune_learning_rate, seed=FLAGS.seed,
          init_classifier=os.path.join(step1_dir, classifier.CLASSIFIER_FILE)),
      cleannet=training.TrainConfig(
          steps=steps, learning_rate=FLAGS.cleannet_learning_rate,
          lr_decay_steps=max(1, steps // 2), eval_every=max(1, steps // 10),
          checkpoint_every=max(1, steps // 10), seed=FLAGS.seed))

  cleannet_dir = os.path.join(work, "cleannet")
  if not alternating.is_finished(cleannet_dir, "step2-cleannet"):
    alternating.train_cleannet(info, cleannet_dir, config,
                               references_path=os.path.join(out, "references.npz"))
  validation = alternating.read_json(
      os.path.join(cleannet_dir, alternating.SUMMARY_FILE))["validation"]
  weights_path = os.path.join(work, alternating.WEIGHTS_FILE)
  if not os.path.exists(weights_path):
    alternating.save_weights(weights_path, alternating.score_with_cleannet(
        cleannet_dir, info, train))
  with np.load(weights_path) as saved:
    weights = {name: saved[name] for name in saved.files}

  sources = {"none": (train, None), "w_hard": (train, weights["w_hard"]),
             "w_soft": (train, weights["w_soft"]),
             "clean": (dataclasses.replace(train, class_ids=clean_ids), None)}
  top1 = {"step1": alternating.read_json(
      os.path.join(step1_dir, alternating.SUMMARY_FILE))["test_top1"]}
  for name in VARIANTS:
    directory = os.path.join(work, f"finetune-{name}")
    if not os.path.exists(os.path.join(directory, alternating.SUMMARY_FILE)):
      source, sample_weights = sources[name]
      classifier.ClassifierTrainer(source, directory, config.finetune,
                                   sample_weights=sample_weights).train(test)
    top1[name] = alternating.read_json(
        os.path.join(directory, alternating.SUMMARY_FILE))["test_top1"]

  # CIFAR-10N knows every row's truth: CleanNet's detection on all 50k rows.
  scored = weights["scored"]
  truth = (train.class_ids == clean_ids).astype(np.int64)
  all_rows = detection.detection_metrics(train.class_ids[scored], truth[scored],
                                         weights["score"][scored],
                                         float(weights["delta"]))
  results = {
      "top1": top1,
      "noise_rate": float(1 - truth.mean()),
      "cleannet_validation_error": validation["avg_class_error"],
      "cleannet_cv_validation_error": validation.get("cv_avg_class_error"),
      "cleannet_all_rows_error": all_rows["avg_class_error"],
      "delta": float(weights["delta"]),
      "weights": {name: alternating.weight_stats(weights[name], scored)
                  for name in ("w_soft", "w_hard")},
      "finetune": {"steps": FLAGS.finetune_steps,
                   "learning_rate": FLAGS.finetune_learning_rate,
                   "batch_size": FLAGS.finetune_batch_size},
      "cleannet_steps": steps,
  }
  data.atomic_write_text(os.path.join(work, "results.json"),
                         json.dumps(results, indent=2) + "\n")
  data.atomic_write_text(os.path.join(work, "results.md"), _markdown(results))
  print(json.dumps(results, indent=2))
  print(_markdown(results))


def run():
  common.run(main)


if __name__ == "__main__":
  run()
