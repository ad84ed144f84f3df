"""Scores every row of a feature set with a trained CleanNet and flags label noise.

  cleannet-score --model=runs/cleannet/model.keras --features=feats/all \
      --output_dir=scores/

Writes one TSV per input shard (key, class, verification, score, is_clean,
w_soft, w_hard); a rerun skips finished shards. Where the feature set has
verified rows, prints the detection metrics on them at the model's
thresholds (its delta, moved for classes without verification labels;
``scoring.class_thresholds``), optimistic if those rows were used for training.
"""

import json

import numpy as np
from absl import flags

from tools import common
from cleannet_tf import data, detection, scoring
from cleannet_tf.errors import InputError

flags.DEFINE_string("model", None, "A .keras file written by cleannet-train.")
flags.DEFINE_string("features", None, "Feature set directory to score.")
flags.DEFINE_string("output_dir", None, "Where the score TSVs go.")
flags.DEFINE_float("delta", None, "Override the delta stored in the model (classes "
                   "without verification labels still get it moved).")
flags.DEFINE_integer("batch_size", 4096, "Rows per scoring batch.")
flags.mark_flags_as_required(["model", "features", "output_dir"])
FLAGS = flags.FLAGS


def main(_):
  model = common.load_keras(FLAGS.model)
  info = data.read_info(FLAGS.features)
  if (info.num_classes, info.dim) != (model.num_classes, model.feature_dim):
    raise InputError(f"{FLAGS.features}: {info.num_classes} classes of {info.dim}-d features, "
                     f"but {FLAGS.model} expects {model.num_classes} of {model.feature_dim}")
  if FLAGS.delta is not None:
    model.delta.assign(FLAGS.delta)
  summary = scoring.score_feature_set(model, info, FLAGS.output_dir, FLAGS.batch_size)
  delta = float(model.delta.numpy())
  report = {"rows": summary.rows, "outputs": summary.outputs, "delta": delta,
            "flagged_mislabeled": summary.flagged}
  verified = summary.verified_arrays()
  if len(verified["score"]):
    thresholds = scoring.class_thresholds(model)
    report["verified_rows"] = detection.detection_metrics(
        verified["class_id"], verified["verification"], verified["score"],
        thresholds[verified["class_id"].astype(np.int64)])
  print(json.dumps(report, indent=2, default=float))


def run():
  common.run(main)


if __name__ == "__main__":
  run()
