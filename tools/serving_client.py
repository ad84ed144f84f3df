"""Scores a feature set (or an image manifest) against a running TF Serving.

  python -m tools.serving_client --server=localhost:8500 --protocol=grpc \
      --features=feats/all --output=scores.tsv
  python -m tools.serving_client --server=localhost:8501 --protocol=rest \
      --images=images.tsv --output=scores.tsv

--images is a manifest of ``image_path \\t class_id`` lines, for a model
exported with a backbone. Writes ``key \\t class_id \\t score \\t is_clean \\t
weight_soft`` (with a header line) atomically, and prints a JSON summary.
"""

import json

from absl import flags

from tools import common
from cleannet_tf import data, serving_client
from cleannet_tf.errors import InputError

flags.DEFINE_string("server", "localhost:8500",
                    "host:port of TF Serving (8500 serves gRPC, 8501 REST by default).")
flags.DEFINE_enum("protocol", "grpc", ["grpc", "rest"], "How to talk to the server.")
flags.DEFINE_string("model_name", "cleannet", "The served model name.")
flags.DEFINE_string("features", None, "Feature set directory to score.")
flags.DEFINE_string("images", None, "Image manifest (image_path<TAB>class_id) to score.")
flags.DEFINE_string("output", None, "The score TSV to write.")
flags.DEFINE_integer("batch_size", 1024, "Feature rows per request.")
flags.DEFINE_integer("image_batch_size", 64, "Images per request.")
flags.DEFINE_float("timeout", 30.0, "Seconds per request.")
flags.DEFINE_integer("tries", 3, "Attempts per request while the server is unreachable.")
flags.DEFINE_float("backoff", 0.5, "Seconds before the second try, doubled after each.")
flags.mark_flags_as_required(["output"])
FLAGS = flags.FLAGS


def main(_):
  if (FLAGS.features is None) == (FLAGS.images is None):
    raise InputError("give exactly one of --features and --images")
  client = serving_client.make_client(FLAGS.protocol, FLAGS.server, FLAGS.model_name,
                                      timeout=FLAGS.timeout, tries=FLAGS.tries,
                                      backoff=FLAGS.backoff)
  try:
    if FLAGS.features is not None:
      rows = serving_client.score_feature_set(client, data.read_info(FLAGS.features),
                                              FLAGS.output, FLAGS.batch_size)
    else:
      rows = serving_client.score_images(client, FLAGS.images, FLAGS.output,
                                         FLAGS.image_batch_size)
  finally:
    client.close()
  print(json.dumps({"rows": rows, "output": FLAGS.output, "server": FLAGS.server,
                    "protocol": FLAGS.protocol}, indent=2))


def run():
  common.run(main)


if __name__ == "__main__":
  run()
