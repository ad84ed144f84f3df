"""Builds per-class reference sets (Sec. 3.1) from a feature set, streaming.

  python -m tools.build_references --features=feats/train/all --out=refs.npz \
      [--num_references=50] [--method=kmeans|random]

Holds one class's features in memory at a time (see
cleannet_tf.references.build_references_streamed); pass the result to
tools.train_cleannet --references.
"""

import json
import time

from absl import flags

from tools import common
from cleannet_tf import data, references

flags.DEFINE_string("features", None, "Feature set directory.")
flags.DEFINE_string("out", None, "Output .npz file.")
flags.DEFINE_integer("num_references", 50, "K: references per class.")
flags.DEFINE_enum("method", "kmeans", ["kmeans", "random"],
                  "K-means centroids (the paper's) or a random sample.")
flags.DEFINE_integer("seed", 0, "Seed; the result is deterministic for it.")
flags.DEFINE_string("work_dir", None, "Folder for the temporary per-class spill.")
flags.mark_flags_as_required(["features", "out"])
FLAGS = flags.FLAGS


def main(_):
  info = data.read_info(FLAGS.features)
  started = time.time()
  sets = references.build_references_streamed(
      info, k=FLAGS.num_references, method=FLAGS.method, seed=FLAGS.seed,
      work_dir=FLAGS.work_dir)
  sets.save(FLAGS.out)
  elapsed = time.time() - started
  print(json.dumps({"references": FLAGS.out, "classes": sets.num_classes,
                    "k": sets.k, "seconds": round(elapsed, 2),
                    "seconds_per_class": round(elapsed / sets.num_classes, 3)},
                   indent=2))


def run():
  common.run(main)


if __name__ == "__main__":
  run()
