"""The alternating training of Sec. 3.3: classifier, CleanNet, weighted fine-tuning.

  python -m tools.train_alternating --manifest=train.csv --test_manifest=test.csv \
      --out=runs/alternating [--rounds=2] [--weighting=soft|hard] \
      [--classifier_steps=5000] [--finetune_steps=1000] [--steps=60000]

Round 1: step 1 trains the classifier on the noisy labels (weights 1);
step 2 extracts features with its backbone and trains CleanNet (K-means
reference sets); step 3 scores every training row with CleanNet and
fine-tunes the classifier with w_soft or w_hard (Eq. 12-14). Later rounds
repeat steps 2-3 from the last classifier, fine-tuning only its dense head.
Artefacts go to <out>/round-<r>/<step>/; a rerun resumes at the first
unfinished step. Prints and writes <out>/summary.json: per round and step,
test top-1, CleanNet's detection error, and the weights' mean and histogram.

CleanNet's flags are those of cleannet-train (--steps, --batch_size,
--learning_rate, ...); the classifier's are prefixed --classifier_ (step 1)
and --finetune_ (step 3).
"""

import json

from absl import flags

from tools import cleannet_flags, common, image_flags
from cleannet_tf import alternating, backbones, classifier, distribute, images

_STEP1 = classifier.ClassifierConfig()
_FINETUNE = alternating.AlternatingConfig().finetune
flags.DEFINE_string("out", None, "Output folder (round-<r>/<step>/, summary.json).")
flags.DEFINE_string("test_manifest", None, "Labelled test manifest for top-1.")
flags.DEFINE_integer("rounds", 1, "Rounds of steps 2-3 (later ones tune the head only).")
flags.DEFINE_enum("weighting", "soft", list(alternating.WEIGHTINGS),
                  "soft: w = max(0, score) (Eq. 12); hard: w = [score >= delta] (Eq. 13).")
flags.DEFINE_integer("stop_after_steps", None,
                     "Stop after running this many steps; a rerun goes on.")
flags.DEFINE_enum("backbone", _STEP1.backbone, list(backbones.BACKBONES), "Backbone.")
flags.DEFINE_string("backbone_weights", None,
                    "imagenet, a .weights.h5 file, or unset for random init.")
flags.DEFINE_integer("image_size", _STEP1.image_size[0], "Square input size.")
flags.DEFINE_integer("classifier_steps", _STEP1.steps, "Step-1 training steps.")
flags.DEFINE_integer("classifier_batch_size", _STEP1.global_batch_size,
                     "Global batch size of steps 1 and 3.")
flags.DEFINE_float("classifier_learning_rate", _STEP1.learning_rate,
                   "Step-1 initial learning rate (cosine decay).")
flags.DEFINE_float("classifier_weight_decay", _STEP1.weight_decay,
                   "Decoupled weight decay on kernels, steps 1 and 3.")
flags.DEFINE_integer("finetune_steps", _FINETUNE.steps, "Step-3 fine-tuning steps.")
flags.DEFINE_float("finetune_learning_rate", _FINETUNE.learning_rate,
                   "Step-3 initial learning rate (cosine decay).")
flags.DEFINE_enum("sample_weighting", _FINETUNE.sample_weighting,
                  list(classifier.SAMPLE_WEIGHTINGS),
                  "How step 3 uses the weights: sampling draws each row with probability "
                  "w / max(w); loss multiplies its cross-entropy by w (Eq. 14).")
flags.DEFINE_integer("extract_batch_size", 256, "Images per extraction batch.")
flags.mark_flags_as_required(["out", "test_manifest"])
FLAGS = flags.FLAGS


def config_from_flags():
  """``AlternatingConfig`` from the flags."""
  shared = dict(backbone=FLAGS.backbone, backbone_weights=FLAGS.backbone_weights,
                image_size=(FLAGS.image_size, FLAGS.image_size),
                global_batch_size=FLAGS.classifier_batch_size,
                weight_decay=FLAGS.classifier_weight_decay, seed=FLAGS.seed)
  model = cleannet_flags.model_config(0, 0)
  for name in ("num_classes", "feature_dim", "num_references"):
    del model[name]  # known once features and reference sets exist
  return alternating.AlternatingConfig(
      rounds=FLAGS.rounds, weighting=FLAGS.weighting,
      step1=classifier.ClassifierConfig(steps=FLAGS.classifier_steps,
                                        learning_rate=FLAGS.classifier_learning_rate,
                                        **shared),
      finetune=classifier.ClassifierConfig(steps=FLAGS.finetune_steps,
                                           learning_rate=FLAGS.finetune_learning_rate,
                                           sample_weighting=FLAGS.sample_weighting,
                                           **shared),
      cleannet_model=model, cleannet=cleannet_flags.train_config(),
      num_references=FLAGS.num_references,
      extract_batch_size=FLAGS.extract_batch_size)


def main(_):
  source = image_flags.source_from_flags()
  test_source = images.read_manifest(FLAGS.test_manifest, source.class_names)
  trainer = alternating.AlternatingTrainer(
      source, test_source, FLAGS.out, config_from_flags(),
      distribute.make_strategy(FLAGS.strategy))
  print(json.dumps(trainer.run(FLAGS.stop_after_steps), indent=2))


def run():
  common.run(main)


if __name__ == "__main__":
  run()
