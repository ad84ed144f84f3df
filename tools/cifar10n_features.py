"""CIFAR-10N from images to features and reference sets, in one command.

  python -m tools.cifar10n_features --data=/path/to/cifar10n --out=runs/cifar10n

Runs, each step resuming or skipping what a previous run finished:
1. manifests (tools.prepare_cifar10n): noisy labels = --label_column, with
   --verified_per_class verification labels per class;
2. step 1: a small ResNet trained on the noisy labels for --epochs, with
   its top-1 on the clean test set; or, with --step1_from, another run's
   finished step 1 (e.g. trained on another label column of the same images)
   copied and measured on the test set, to see what better features are worth;
3. feature extraction of the training images into <out>/features/all;
4. K-means reference sets into <out>/references.npz.
Then: python -m tools.train_cleannet --train_features=<out>/features/all \
  --references=<out>/references.npz --model_dir=<out>/cleannet
"""

import json
import os
import time

from absl import flags

from tools import common, prepare_cifar10n  # pylint: disable=unused-import (its flags)
from cleannet_tf import classifier, data, extraction, images, references

flags.DEFINE_float("epochs", 3.0, "Step-1 training epochs over the 50k images.")
flags.DEFINE_integer("batch_size", 128, "Step-1 batch size.")
flags.DEFINE_float("learning_rate", 0.1, "Step-1 initial learning rate.")
flags.DEFINE_integer("num_references", 50, "K: references per class.")
flags.DEFINE_integer("extract_batch_size", 512, "Images per extraction batch.")
flags.DEFINE_string("step1_from", None,
                    "A finished step1/ folder of another run whose network gives the "
                    "features, instead of training one on these labels (a diagnostic: "
                    "features of a network trained on other labels of the same images).")
FLAGS = flags.FLAGS


def main(_):
  out = FLAGS.out
  timings = {}
  manifests = prepare_cifar10n.prepare(FLAGS.data, out, FLAGS.label_column,
                                       FLAGS.verified_per_class, FLAGS.seed)
  class_names = data.read_class_names(manifests["classes"])
  train = images.read_manifest(manifests["train"], class_names)
  test = images.read_manifest(manifests["test"], class_names)

  started = time.time()
  steps = int(round(FLAGS.epochs * train.num_rows / FLAGS.batch_size))
  config = classifier.ClassifierConfig(
      image_size=(32, 32), steps=steps, global_batch_size=FLAGS.batch_size,
      learning_rate=FLAGS.learning_rate, seed=FLAGS.seed)
  step1_dir = os.path.join(out, "step1")
  if FLAGS.step1_from:
    step1 = classifier.reuse_finished(FLAGS.step1_from, step1_dir, test)
  else:
    step1 = classifier.ClassifierTrainer(train, step1_dir, config).train(test)
  timings["step1_seconds"] = time.time() - started

  started = time.time()
  extractor = extraction.load_feature_extractor(
      os.path.join(step1_dir, classifier.FEATURE_EXTRACTOR_FILE))
  parts = extraction.extract_features(train, extractor, os.path.join(out, "features"),
                                      batch_size=FLAGS.extract_batch_size)
  info = extraction.merge_feature_sets(parts, os.path.join(out, "features", "all"))
  timings["extraction_seconds"] = time.time() - started

  started = time.time()
  sets = references.build_references_streamed(info, k=FLAGS.num_references,
                                               seed=FLAGS.seed)
  sets.save(os.path.join(out, "references.npz"))
  timings["references_seconds_per_class"] = (time.time() - started) / info.num_classes
  print(json.dumps({
      "step1_test_top1": step1.get("test_top1"), "features": info.directory,
      "feature_rows": info.num_rows, "dim": info.dim,
      "references": os.path.join(out, "references.npz"),
      "noise_rate": manifests["noise_rate"], "step1_from": step1.get("reused_from"),
      **timings}, indent=2))


def run():
  common.run(main)


if __name__ == "__main__":
  run()
