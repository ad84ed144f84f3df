"""Trains CleanNet on a feature set; a rerun with the same --model_dir resumes.

  cleannet-train --train_features=feats/train --model_dir=runs/cleannet \
      [--references=refs.npz] [--val_features=feats/val] [--steps=60000]

Without --references, per-class K-means reference sets (K = --num_references)
are built from the training features and kept as <model_dir>/references.npz.
Writes <model_dir>/model.keras (best validation model, delta inside),
summary.json, checkpoints/ and tensorboard/.
"""

import json
import os

from absl import flags

from tools import cleannet_flags, common  # pylint: disable=unused-import
from cleannet_tf import data, distribute, references as references_lib, training

flags.DEFINE_string("train_features", None, "Feature set directory to train on.")
flags.DEFINE_string("val_features", None,
                    "Optional feature set whose verified rows validate; default: hold out "
                    "--val_fraction of the training set's verified rows.")
flags.DEFINE_string("references", None, "Reference sets (.npz from cleannet_tf.references).")
flags.DEFINE_string("model_dir", None, "Output and checkpoint directory.")
flags.mark_flags_as_required(["train_features", "model_dir"])
FLAGS = flags.FLAGS


def main(_):
  info = data.read_info(FLAGS.train_features)
  val_info = data.read_info(FLAGS.val_features) if FLAGS.val_features else None
  os.makedirs(FLAGS.model_dir, exist_ok=True)
  strategy = distribute.make_strategy(FLAGS.strategy)
  reference_sets = references_lib.load_or_build(
      info, FLAGS.references, FLAGS.model_dir, FLAGS.num_references, FLAGS.seed)
  model_config = cleannet_flags.model_config(info.num_classes, info.dim)
  model_config["num_references"] = reference_sets.k
  trainer = training.Trainer(model_config, reference_sets, info, FLAGS.model_dir,
                             cleannet_flags.train_config(), strategy, val_info)
  result = trainer.train()
  print(json.dumps({"model": result.model_path, "best_step": result.best_step,
                    "validation": result.best_metrics}, indent=2, default=float))


def run():
  common.run(main)


if __name__ == "__main__":
  run()
