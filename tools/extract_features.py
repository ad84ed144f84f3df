"""Extracts f_v features of images into feature sets, in parts machines share.

  python -m tools.extract_features --manifest=train.csv \
      --feature_extractor=runs/step1/feature_extractor.keras --out=feats/train \
      [--num_shards=100 --shard_index=7]

Rows are cut into --num_shards contiguous parts; part i is written to
<out>/part-<i>-of-<S>/ as a complete feature set with its rejects.tsv
(unreadable images: key, path, reason). Without --shard_index this process
does every unfinished part; finished parts are skipped, so a killed job is
resumed by rerunning it. When all parts are finished, they are merged (by
hard links, no copy) into <out>/all, the feature set for train_cleannet.
"""

import json

from absl import flags
from absl import logging

from tools import common, image_flags
from cleannet_tf import extraction

flags.DEFINE_string("feature_extractor", None,
                    "feature_extractor.keras from tools.train_classifier.")
flags.DEFINE_string("out", None, "Output folder of the parts and the merged set.")
flags.DEFINE_integer("num_shards", 1, "Parts the rows are cut into.")
flags.DEFINE_integer("shard_index", None, "The one part to do; default: all.")
flags.DEFINE_integer("batch_size", 256, "Images per forward pass.")
flags.DEFINE_integer("rows_per_shard", 100_000, "Rows per TFRecord file in a part.")
flags.DEFINE_integer("log_every", 50, "Log images/s every this many batches.")
flags.mark_flags_as_required(["feature_extractor", "out"])
FLAGS = flags.FLAGS


def main(_):
  source = image_flags.source_from_flags()
  extractor = extraction.load_feature_extractor(FLAGS.feature_extractor)
  extraction.extract_features(
      source, extractor, FLAGS.out, FLAGS.num_shards,
      None if FLAGS.shard_index is None else [FLAGS.shard_index],
      batch_size=FLAGS.batch_size, rows_per_shard=FLAGS.rows_per_shard,
      log_every=FLAGS.log_every)
  parts = [extraction.part_directory(FLAGS.out, i, FLAGS.num_shards)
           for i in range(FLAGS.num_shards)]
  waiting = [p for p in parts if not extraction.is_finished(p)]
  if waiting:
    logging.info("%d parts not finished yet (e.g. %s); not merging", len(waiting),
                 waiting[0])
    return
  info = extraction.merge_feature_sets(parts, f"{FLAGS.out}/all")
  print(json.dumps({"features": info.directory, "rows": info.num_rows,
                    "dim": info.dim, "classes": info.num_classes}, indent=2))


def run():
  common.run(main)


if __name__ == "__main__":
  run()
