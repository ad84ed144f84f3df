"""Scoring (query, noisy class) pairs with a trained CleanNet (Sec. 3.2-3.3).

Class embeddings are computed once for all L classes, then each batch only runs
the query encoder: scoring costs O(N) encoder passes, not O(N K).
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

from cleannet_tf import data, detection

SCORE_COLUMNS = ("key", "class_id", "class_name", "verification", "score", "is_clean",
                 "w_soft", "w_hard")


class Scorer:
  """Scores raw features against a model's precomputed class embeddings.

  One traced function serves every call; ``refresh()`` recomputes the class
  embeddings after the model's weights change (during training).
  """

  def __init__(self, model):
    self.model = model
    self._score = tf.function(
        model.score_with_class_embeddings,
        input_signature=[tf.TensorSpec([None, model.feature_dim], tf.float32),
                         tf.TensorSpec([None], tf.int64),
                         tf.TensorSpec([model.num_classes, model.embedding_dim], tf.float32)])
    self.refresh()

  def refresh(self):
    self.class_embeddings, self.attention = self.model.class_embeddings()

  def score(self, features, class_ids, batch_size=4096):
    """features float [N, D], class_ids int [N] -> scores float32 [N]."""
    scores = [self._score(tf.constant(features[start:start + batch_size], tf.float32),
                          tf.constant(class_ids[start:start + batch_size], tf.int64),
                          self.class_embeddings).numpy()
              for start in range(0, len(features), batch_size)]
    return np.concatenate(scores) if scores else np.zeros([0], np.float32)


def class_thresholds(model) -> np.ndarray:
  """`model`'s threshold of each class, float64 [L] (``detection.class_thresholds``).

  Its delta, moved for each class that had no verification labels in
  training by that class's score quartiles (``set_class_score_quartiles``).
  """
  return detection.class_thresholds(float(model.delta.numpy()), model.score_quartiles.numpy(),
                                    model.verified_classes.numpy())


def set_class_score_quartiles(model, info, verified_classes, batch_size=4096):
  """Records each class's score quartiles over all rows of `info` in `model`.

  One streamed pass (memory: a batch and ``detection.ClassScoreQuartiles``'s
  histograms). Labels are not used, so every row counts, verified or not.

  Args:
    model: a CleanNet, trained.
    info: the feature set it was trained on.
    verified_classes: [L] of {0, 1}, 1 for the classes that had verification
      labels in training; all ones gives every class the one delta.
  """
  scorer = Scorer(model)
  quartiles = detection.ClassScoreQuartiles(model.num_classes)
  for batch in data.feature_dataset(info).batch(batch_size).as_numpy_iterator():
    quartiles.add(batch["class_id"], scorer.score(batch["features"], batch["class_id"],
                                                  batch_size))
  model.score_quartiles.assign(np.nan_to_num(quartiles.quartiles()).astype(np.float32))
  model.verified_classes.assign(np.asarray(verified_classes, np.int32))


def _format_rows(rows, scores, thresholds, class_names):
  """Tab-separated output lines for one batch (no per-row Python loop but the join).

  `thresholds` float [L]: each class's (``class_thresholds``).
  """
  w_soft, w_hard = detection.sample_weights(scores, thresholds[rows["class_id"]])
  names = np.asarray(class_names, dtype=object)[rows["class_id"]]
  keys = [key.decode("utf-8") for key in rows["key"]]
  columns = zip(keys, rows["class_id"].tolist(), names, rows["verification"].tolist(),
                np.char.mod("%.6f", scores), w_hard.astype(np.int64).tolist(),
                np.char.mod("%.6f", w_soft), w_hard.astype(np.int64).tolist())
  return "".join("\t".join(map(str, row)) + "\n" for row in columns)


@dataclasses.dataclass
class ScoreSummary:
  """What ``score_feature_set`` wrote, and the verified rows' scores."""
  outputs: list
  rows: int = 0
  flagged: int = 0
  verified: dict = dataclasses.field(default_factory=lambda: {
      "class_id": [], "verification": [], "score": []})

  def add(self, class_id, verification, score, is_clean):
    self.rows += len(score)
    self.flagged += int((is_clean == 0).sum())
    keep = verification >= 0
    for name, values in (("class_id", class_id), ("verification", verification),
                         ("score", score)):
      self.verified[name].append(np.asarray(values)[keep])

  def verified_arrays(self):
    """Verified rows as numpy arrays: class_id, verification, score."""
    return {name: np.concatenate(parts) if parts else np.zeros([0])
            for name, parts in self.verified.items()}


def _summarize_written(path, summary):
  """Adds an already written score shard (a resumed run) to the summary."""
  columns = [SCORE_COLUMNS.index(name)
             for name in ("class_id", "verification", "score", "is_clean")]
  table = np.loadtxt(path, delimiter="\t", skiprows=1, usecols=columns, ndmin=2,
                     comments=None)
  summary.add(table[:, 0].astype(np.int64), table[:, 1].astype(np.int64), table[:, 2],
              table[:, 3])


def score_feature_set(model, info, output_dir, batch_size=4096):
  """Scores every row of a feature set, one TSV per input shard.

  Each output shard appears atomically (written aside, then renamed), and a
  rerun skips shards already written, so a killed job resumes. Memory holds
  one batch plus the verified rows' scores. Returns a ``ScoreSummary``.
  """
  os.makedirs(output_dir, exist_ok=True)
  scorer = Scorer(model)
  thresholds = class_thresholds(model)
  summary = ScoreSummary(outputs=[])
  shard_rows = info.shard_num_rows or (0,) * len(info.shard_paths)
  for shard_path, num_rows in zip(info.shard_paths, shard_rows):
    name = os.path.basename(shard_path).rsplit(".", 1)[0]
    output_path = os.path.join(output_dir, f"scores-{name}.tsv")
    summary.outputs.append(output_path)
    if os.path.exists(output_path):
      _summarize_written(output_path, summary)
      continue
    shard = dataclasses.replace(info, shard_paths=(shard_path,), num_rows=num_rows,
                                shard_num_rows=(num_rows,) if num_rows else ())
    temporary = output_path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as out:
      out.write("\t".join(SCORE_COLUMNS) + "\n")
      for batch in data.feature_dataset(shard).batch(batch_size).as_numpy_iterator():
        scores = scorer.score(batch["features"], batch["class_id"], batch_size)
        out.write(_format_rows(batch, scores, thresholds, info.class_names))
        summary.add(batch["class_id"], batch["verification"], scores,
                    scores >= thresholds[batch["class_id"]])
    os.replace(temporary, output_path)
  return summary
