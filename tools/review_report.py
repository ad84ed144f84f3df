"""Writes a self-contained HTML review report for a scored data set.

  cleannet-review --model=runs/cleannet/model.keras --features=feats/all \
      --scores_dir=scores/ --manifest=images.csv --output_dir=review/

Open review/index.html in a browser (offline: no external files). It shows the
classes sorted by estimated noise rate, per class the score histogram with
delta, the suspects (lowest scores), the highest scores and the references
with the most and least attention, and a "verify next" list, also written as
review/verify_next.csv to be filled in and fed back as verification labels.
"""

import glob
import json
import os

from absl import flags

from tools import common
from cleannet_tf import data, report
from cleannet_tf.errors import InputError

flags.DEFINE_string("model", None, "A .keras file written by cleannet-train.")
flags.DEFINE_string("features", None, "The scored feature set directory.")
flags.DEFINE_string("scores_dir", None, "Folder of the score TSVs written by cleannet-score.")
flags.DEFINE_string("manifest", None,
                    "Optional CSV with columns key,path (relative to the CSV) locating the "
                    "images, and optionally clean_label; without it no thumbnails are shown.")
flags.DEFINE_string("truth", None,
                    "Optional CSV key,clean_label (class name or id): the measured noise rate "
                    "is shown beside the estimate.")
flags.DEFINE_string("output_dir", None, "The report folder (replaced if it exists).")
flags.DEFINE_integer("per_class", 12, "Lowest and highest scored images shown per class.",
                     lower_bound=1)
flags.DEFINE_integer("verify_budget", 200, "Rows listed in verify_next.csv.", lower_bound=0)
flags.mark_flags_as_required(["model", "features", "scores_dir", "output_dir"])
FLAGS = flags.FLAGS


def main(_):
  model = common.load_keras(FLAGS.model)
  info = data.read_info(FLAGS.features)
  score_paths = sorted(glob.glob(os.path.join(glob.escape(FLAGS.scores_dir), "scores-*.tsv")))
  if not score_paths:
    raise InputError(f"{FLAGS.scores_dir}: no scores-*.tsv files (run cleannet-score first)")
  summary = report.write_report(model, info, score_paths, FLAGS.output_dir,
                                manifest=FLAGS.manifest, truth=FLAGS.truth,
                                per_class=FLAGS.per_class, verify_budget=FLAGS.verify_budget)
  print(json.dumps(summary, indent=2))


def run():
  common.run(main)


if __name__ == "__main__":
  run()
