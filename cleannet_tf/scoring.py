"""Scoring (query, noisy class) pairs with a trained CleanNet (Sec. 3.2-3.3).

Class embeddings are computed once for all L classes, then each batch only runs
the query encoder: scoring costs O(N) encoder passes, not O(N K).
"""

import os

import numpy as np
import tensorflow as tf

from cleannet_tf import data, detection

SCORE_COLUMNS = ("key", "class_id", "class_name", "verification", "score", "is_clean",
                 "w_soft", "w_hard")


class Scorer:
  """Scores raw features against a model's precomputed class embeddings."""

  def __init__(self, model):
    self.model = model
    self.class_embeddings, self.attention = model.class_embeddings()
    self._score = tf.function(
        lambda features, class_id: model.score_with_class_embeddings(
            features, class_id, self.class_embeddings),
        input_signature=[tf.TensorSpec([None, model.feature_dim], tf.float32),
                         tf.TensorSpec([None], tf.int64)])

  def score(self, features, class_ids, batch_size=4096):
    """features float [N, D], class_ids int [N] -> scores float32 [N]."""
    scores = [self._score(tf.constant(features[start:start + batch_size], tf.float32),
                          tf.constant(class_ids[start:start + batch_size], tf.int64)).numpy()
              for start in range(0, len(features), batch_size)]
    return np.concatenate(scores) if scores else np.zeros([0], np.float32)


def _format_rows(rows, scores, delta, class_names):
  """Tab-separated output lines for one batch (no per-row Python loop but the join)."""
  w_soft, w_hard = detection.sample_weights(scores, delta)
  names = np.asarray(class_names, dtype=object)[rows["class_id"]]
  keys = [key.decode("utf-8") for key in rows["key"]]
  columns = zip(keys, rows["class_id"].tolist(), names, rows["verification"].tolist(),
                np.char.mod("%.6f", scores), w_hard.astype(np.int64).tolist(),
                np.char.mod("%.6f", w_soft), w_hard.astype(np.int64).tolist())
  return "".join("\t".join(map(str, row)) + "\n" for row in columns)


def score_feature_set(model, info, output_dir, batch_size=4096):
  """Scores every row of a feature set, one TSV per input shard.

  Each output shard appears atomically (written aside, then renamed), and a
  rerun skips shards already written, so a killed job resumes. Returns the
  list of output paths, in input-shard order.
  """
  os.makedirs(output_dir, exist_ok=True)
  scorer = Scorer(model)
  delta = float(model.delta.numpy())
  outputs = []
  for shard_path in info.shard_paths:
    name = os.path.basename(shard_path).rsplit(".", 1)[0]
    output_path = os.path.join(output_dir, f"scores-{name}.tsv")
    outputs.append(output_path)
    if os.path.exists(output_path):
      continue
    temporary = output_path + ".tmp"
    shard = data.FeatureSetInfo(
        directory=info.directory, dim=info.dim, class_names=info.class_names,
        num_rows=0, shard_paths=(shard_path,), class_counts=info.class_counts)
    with open(temporary, "w", encoding="utf-8") as out:
      out.write("\t".join(SCORE_COLUMNS) + "\n")
      for batch in data.feature_dataset(shard).batch(batch_size).as_numpy_iterator():
        scores = scorer.score(batch["features"], batch["class_id"], batch_size)
        out.write(_format_rows(batch, scores, delta, info.class_names))
    os.replace(temporary, output_path)
  return outputs


def read_scores(paths):
  """Reads score TSVs back: dict of numpy columns (key as str)."""
  tables = [np.genfromtxt(path, delimiter="\t", names=True, dtype=None, encoding="utf-8",
                          comments=None, ndmin=1) for path in paths]
  table = np.concatenate(tables)
  return {name: table[name] for name in table.dtype.names}
