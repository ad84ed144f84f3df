"""Exports a trained CleanNet as a SavedModel that TF Serving serves as is.

  python -m tools.export_savedmodel --model=runs/cleannet/model.keras --output_dir=export \
      --model_name=cleannet [--version=N] \
      [--backbone=backbone.keras --image_size=224] [--warmup_features=feats/val]

Writes ``<output_dir>/<model_name>/<version>/`` (version: 1 + the largest
existing one unless given; an existing version is never overwritten). Class
names come from --warmup_features when given, else --class_names. See
export/README.md for serving it and cleannet_tf/export.py for the signatures.
"""

import json

from absl import flags
import numpy as np

from tools import common
from cleannet_tf import data, export
from cleannet_tf.errors import InputError

flags.DEFINE_string("model", None, "A .keras file written by cleannet-train.")
flags.DEFINE_string("output_dir", "export", "Export root; the model goes to <it>/<model_name>/.")
flags.DEFINE_string("model_name", "cleannet", "Model directory and served model name.")
flags.DEFINE_integer("version", None, "Version number; default 1 + the largest existing one.")
flags.DEFINE_string("backbone", None,
                    "Optional .keras model mapping float32 images [N, S, S, 3] in [0, 255] to "
                    "features [N, D]; adds the score_images signature.")
flags.DEFINE_integer("image_size", None,
                     "Side S images are resized to; default the backbone's input size.")
flags.DEFINE_string("warmup_features", None,
                    "Feature set whose first rows become the warm-up requests; its "
                    "classes.txt gives the class names.")
flags.DEFINE_integer("warmup_rows", 8, "Rows of --warmup_features used for warm-up.")
flags.DEFINE_string("class_names", None,
                    "classes.txt (one name per line) when there is no --warmup_features.")
flags.mark_flags_as_required(["model"])
FLAGS = flags.FLAGS


def warmup_rows(info, count):
  """The first `count` rows of a feature set, as export_savedmodel's `warmup`."""
  rows = next(data.feature_dataset(info).take(count).batch(count).as_numpy_iterator())
  return {"features": rows["features"], "class_id": rows["class_id"]}


def main(_):
  model = common.load_keras(FLAGS.model, "a CleanNet model")
  if FLAGS.image_size and not FLAGS.backbone:
    raise InputError("--image_size needs --backbone")
  backbone = common.load_keras(FLAGS.backbone, "a backbone") if FLAGS.backbone else None
  warmup = None
  if FLAGS.warmup_features:
    info = data.read_info(FLAGS.warmup_features)
    if info.dim != model.feature_dim:
      raise InputError(f"{FLAGS.warmup_features}: {info.dim}-d features, but {FLAGS.model} "
                       f"expects {model.feature_dim}")
    class_names = info.class_names
    warmup = warmup_rows(info, FLAGS.warmup_rows)
  elif FLAGS.class_names:
    class_names = data.read_class_names(FLAGS.class_names)
  else:
    raise InputError("give --warmup_features or --class_names: the export ships the class "
                     "names")
  path = export.export_savedmodel(
      model, class_names, FLAGS.output_dir, FLAGS.model_name, FLAGS.version,
      backbone=backbone, image_size=FLAGS.image_size, warmup=warmup)
  print(json.dumps({"export": path, "classes": len(class_names),
                    "delta": float(np.asarray(model.delta)),
                    "warmup_rows": 0 if warmup is None else len(warmup["class_id"])}, indent=2))


def run():
  common.run(main)


if __name__ == "__main__":
  run()
