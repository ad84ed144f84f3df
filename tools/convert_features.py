"""Converts feature files in the CleanNet authors' TSV layout into a feature set.

  cleannet-convert --tsv=train.tsv[,more.tsv] --class_names=classes.txt \
      --output_dir=feats/train [--rejects=rejects.tsv]

Each TSV line: key, class name, verification label (1 correct, 0 mislabeled,
-1 unknown), comma-joined features. A bad line stops the job with a one-line
error naming the file and line, or, with --rejects, goes to that file with
its reason while the other lines are converted.
"""

import json

from absl import flags

from tools import common
from cleannet_tf import data

flags.DEFINE_list("tsv", None, "TSV files in the authors' layout.")
flags.DEFINE_string("class_names", None, "Class names, one per line; line i is class i.")
flags.DEFINE_string("output_dir", None, "Feature set directory to write.")
flags.DEFINE_string("rejects", None, "Write bad lines here with their reasons instead of "
                    "stopping at the first.")
flags.DEFINE_integer("rows_per_shard", 100_000, "Rows per TFRecord shard.")
flags.mark_flags_as_required(["tsv", "class_names", "output_dir"])
FLAGS = flags.FLAGS


def main(_):
  names = data.read_class_names(FLAGS.class_names)
  info = data.convert_tsv(FLAGS.tsv, names, FLAGS.output_dir, FLAGS.rows_per_shard,
                          FLAGS.rejects)
  print(json.dumps({"output_dir": info.directory, "rows": info.num_rows, "dim": info.dim,
                    "classes": info.num_classes, "verified": info.num_verified,
                    "shards": len(info.shard_paths)}, indent=2))


def run():
  common.run(main)


if __name__ == "__main__":
  run()
