"""Seconds per class of reference-set building at WebVision scale.

  python -m tools.benchmark_references [--classes=3 --rows_per_class=2400 --dim=2048 --k=50]

Writes a synthetic feature set (ReLU-like features around per-class centres)
with the given shape into a temporary folder, builds the reference sets with
the streamed builder the tools use, and prints seconds per class for K-means
(the paper's) and random sampling in the same run. WebVision has 1,000
classes of ~2,400 images with 2,048-d ResNet-50 features: multiply.
"""

import tempfile
import time

from absl import flags
import numpy as np

from tools import common
from cleannet_tf import data, references

flags.DEFINE_integer("classes", 3, "Classes to time (the cost is per class).")
flags.DEFINE_integer("rows_per_class", 2400, "Images per class.")
flags.DEFINE_integer("dim", 2048, "Feature width.")
flags.DEFINE_integer("k", 50, "References per class.")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic data and of K-means.")
FLAGS = flags.FLAGS


def main(_):
  rng = np.random.default_rng(FLAGS.seed)
  n = FLAGS.classes * FLAGS.rows_per_class
  class_ids = np.repeat(np.arange(FLAGS.classes), FLAGS.rows_per_class)
  centres = rng.gamma(1.0, 1.0, size=(FLAGS.classes, FLAGS.dim)).astype(np.float32)
  with tempfile.TemporaryDirectory() as work:
    with data.FeatureWriter(f"{work}/features", FLAGS.dim,
                            [f"class{c}" for c in range(FLAGS.classes)]) as writer:
      for start in range(0, n, 4096):
        rows = class_ids[start:start + 4096]
        noise = rng.normal(scale=0.5, size=(len(rows), FLAGS.dim)).astype(np.float32)
        writer.write(np.array([f"row{i}" for i in range(start, start + len(rows))]),
                     np.maximum(centres[rows] + noise, 0.0), rows,
                     np.full(len(rows), -1), first_row=start + 1)
    feature_set = data.read_info(f"{work}/features")
    print(f"{FLAGS.classes} classes x {FLAGS.rows_per_class} rows x {FLAGS.dim}-d, K={FLAGS.k}")
    for method in ("kmeans", "random"):
      started = time.perf_counter()
      references.build_references_streamed(feature_set, k=FLAGS.k, method=method,
                                           seed=FLAGS.seed, work_dir=work)
      per_class = (time.perf_counter() - started) / FLAGS.classes
      print(f"  {method:<7} {per_class:7.2f} s/class  "
            f"(1,000 classes: {per_class * 1000 / 60:.0f} min)")


def run():
  common.run(main)


if __name__ == "__main__":
  run()
