"""Trains the image classifier (step 1, or step 3 with weights); a rerun resumes.

  python -m tools.train_classifier --manifest=train.csv --model_dir=runs/step1 \
      [--test_manifest=test.csv] [--backbone=resnet50 --backbone_weights=imagenet \
      --image_size=224] [--steps=5000]

Step 3 (Sec. 3.3): fine-tune a trained classifier with CleanNet's weights of
the same manifest's rows (a weights.npz of tools.train_alternating):

  python -m tools.train_classifier --manifest=train.csv --model_dir=runs/step3 \
      --init_classifier=runs/step1/classifier.keras \
      --sample_weights=weights.npz --weighting=soft [--freeze_backbone]

Writes <model_dir>/classifier.keras, feature_extractor.keras (f_v, for
tools.extract_features), summary.json (with the test top-1) and checkpoints/.
"""

import json
import os

from absl import flags

from tools import common, image_flags
from cleannet_tf import alternating, backbones, classifier, distribute, images

_DEFAULT = classifier.ClassifierConfig()
flags.DEFINE_string("model_dir", None, "Output and checkpoint directory.")
flags.DEFINE_string("test_manifest", None,
                    "Labelled test manifest for the final top-1 accuracy.")
flags.DEFINE_enum("backbone", _DEFAULT.backbone, list(backbones.BACKBONES),
                  "Backbone; resnet50 is the paper's.")
flags.DEFINE_string("backbone_weights", None,
                    "imagenet, a .weights.h5 file, or unset for random init.")
flags.DEFINE_integer("image_size", _DEFAULT.image_size[0], "Square input size.")
flags.DEFINE_integer("steps", _DEFAULT.steps, "Total steps (a rerun resumes).")
flags.DEFINE_integer("batch_size", _DEFAULT.global_batch_size, "Global batch size.")
flags.DEFINE_float("learning_rate", _DEFAULT.learning_rate,
                   "Initial SGD learning rate (cosine decay to 0).")
flags.DEFINE_float("momentum", _DEFAULT.momentum, "SGD momentum.")
flags.DEFINE_float("weight_decay", _DEFAULT.weight_decay,
                   "Decoupled weight decay on kernels.")
flags.DEFINE_integer("checkpoint_every", _DEFAULT.checkpoint_every, "Checkpoint period.")
flags.DEFINE_integer("log_every", _DEFAULT.log_every, "Progress period.")
flags.DEFINE_integer("seed", _DEFAULT.seed, "Seed for init, shuffling, augmentation.")
flags.DEFINE_enum("strategy", "auto", list(distribute.STRATEGIES),
                  "auto: MultiWorkerMirrored with TF_CONFIG, Mirrored on GPUs, else default.")
flags.DEFINE_string("init_classifier", None,
                    "classifier.keras to fine-tune (same backbone and classes).")
flags.DEFINE_bool("freeze_backbone", False,
                  "Train the dense head only (later rounds of Sec. 3.3).")
flags.DEFINE_string("sample_weights", None,
                    "weights.npz with w_soft/w_hard per manifest row; unset: all 1.")
flags.DEFINE_enum("weighting", "soft", list(alternating.WEIGHTINGS),
                  "Which weights of --sample_weights: soft (Eq. 12) or hard (Eq. 13).")
flags.DEFINE_enum("sample_weighting", _DEFAULT.sample_weighting,
                  list(classifier.SAMPLE_WEIGHTINGS),
                  "How --sample_weights enter training: sampling draws each row with "
                  "probability w / max(w); loss multiplies its cross-entropy by w.")
flags.mark_flags_as_required(["model_dir"])
FLAGS = flags.FLAGS


def main(_):
  source = image_flags.source_from_flags()
  test_source = None
  if FLAGS.test_manifest:
    test_source = images.read_manifest(FLAGS.test_manifest, source.class_names)
  config = classifier.ClassifierConfig(
      backbone=FLAGS.backbone, backbone_weights=FLAGS.backbone_weights,
      image_size=(FLAGS.image_size, FLAGS.image_size), steps=FLAGS.steps,
      global_batch_size=FLAGS.batch_size, learning_rate=FLAGS.learning_rate,
      momentum=FLAGS.momentum, weight_decay=FLAGS.weight_decay,
      checkpoint_every=FLAGS.checkpoint_every, log_every=FLAGS.log_every,
      seed=FLAGS.seed, init_classifier=FLAGS.init_classifier,
      train_backbone=not FLAGS.freeze_backbone,
      sample_weighting=FLAGS.sample_weighting)
  weights = None
  if FLAGS.sample_weights:
    weights = alternating.load_weights(FLAGS.sample_weights, FLAGS.weighting,
                                       source.num_rows)
  os.makedirs(FLAGS.model_dir, exist_ok=True)
  trainer = classifier.ClassifierTrainer(
      source, FLAGS.model_dir, config, distribute.make_strategy(FLAGS.strategy),
      weights)
  summary = trainer.train(test_source)
  print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))


def run():
  common.run(main)


if __name__ == "__main__":
  run()
