"""Scoring throughput of the exported SavedModel beside NumPy doing the same math.

  python -m tools.benchmark_export [--feature_dim=2048 --num_classes=1000 \
      --batch_sizes=1,64,4096 --seconds=2]

Builds a CleanNet with random weights (throughput does not depend on them),
exports it, loads the SavedModel and times ``serving_default`` against a NumPy
implementation of the serving math with the Keras model's weights: log1p
normalisation, the query encoder's two tanh layers, and the cosine to the
precomputed class embedding of each row's class. Both see the same inputs in
the same run, in alternating timing windows of which the best counts (on a
shared machine the others measure its load); the table also shows their largest
score difference.
"""

import tempfile
import time

from absl import flags
import numpy as np
import tensorflow as tf

from tools import common
from cleannet_tf import export
from cleannet_tf import model as model_lib

flags.DEFINE_integer("feature_dim", 2048, "D, the feature width.")
flags.DEFINE_integer("num_classes", 1000, "L, the number of classes.")
flags.DEFINE_integer("num_references", 4,
                     "K; only the export-time class embeddings depend on it.")
flags.DEFINE_integer("query_hidden_dim", 256, "Query encoder hidden width.")
flags.DEFINE_integer("embedding_dim", 128, "E, the embedding width.")
flags.DEFINE_list("batch_sizes", ["1", "64", "4096"], "Batch sizes to time.")
flags.DEFINE_float("seconds", 1.0, "Length of one timing window.")
flags.DEFINE_integer("repeats", 3, "Timing windows per batch size and implementation; the "
                     "best counts.")
FLAGS = flags.FLAGS


def random_model(rng):
  model = model_lib.CleanNet(
      FLAGS.num_classes, FLAGS.num_references, FLAGS.feature_dim,
      query_hidden_dim=FLAGS.query_hidden_dim, embedding_dim=FLAGS.embedding_dim)
  model.reference_features.assign(rng.random(
      (FLAGS.num_classes, FLAGS.num_references, FLAGS.feature_dim), np.float32))
  model.reference_counts.assign(np.full([FLAGS.num_classes], FLAGS.num_references, np.int32))
  return model


def numpy_scorer(model):
  """The serving math in NumPy: (features [N, D], class_id [N]) -> scores [N]."""
  hidden, embedding = model.query_encoder.encoder_hidden, model.query_encoder.encoder_embedding
  w1, b1 = hidden.kernel.numpy(), hidden.bias.numpy()
  w2, b2 = embedding.kernel.numpy(), embedding.bias.numpy()
  classes = model.class_embeddings()[0].numpy()
  classes /= np.linalg.norm(classes, axis=1, keepdims=True)

  def score(features, class_id):
    normalized = np.sign(features) * np.log1p(np.abs(features))
    query = np.tanh(np.tanh(normalized @ w1 + b1) @ w2 + b2)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    return np.einsum("ne,ne->n", query, classes[class_id])

  return score


def rows_per_second(score, features, class_id, seconds):
  """Calls score(features, class_id) repeatedly for `seconds` -> rows/s."""
  score(features, class_id)  # warm-up: tracing, allocation
  calls, start = 0, time.perf_counter()
  while (elapsed := time.perf_counter() - start) < seconds:
    score(features, class_id)
    calls += 1
  return calls * len(features) / elapsed


def main(_):
  rng = np.random.default_rng(0)
  model = random_model(rng)
  with tempfile.TemporaryDirectory() as root:
    names = [f"class{i}" for i in range(FLAGS.num_classes)]
    loaded = tf.saved_model.load(export.export_savedmodel(model, names, root))
  serving = loaded.signatures[export.SCORE_SIGNATURE]

  def exported(features, class_id):
    return serving(features=tf.constant(features), class_id=tf.constant(class_id))["score"]

  reference = numpy_scorer(model)
  print(f"D={FLAGS.feature_dim} L={FLAGS.num_classes} E={FLAGS.embedding_dim} "
        f"hidden={FLAGS.query_hidden_dim} device={tf.config.list_logical_devices()[-1].name}")
  print(f"{'batch':>6} {'export rows/s':>14} {'numpy rows/s':>14} {'export/numpy':>13} "
        f"{'max |diff|':>11}")
  for batch in map(int, FLAGS.batch_sizes):
    # Non-negative, as pooled ReLU features are.
    features = rng.random((batch, FLAGS.feature_dim), np.float32) * 4
    class_id = rng.integers(0, FLAGS.num_classes, batch)
    difference = np.abs(exported(features, class_id).numpy()
                        - reference(features, class_id)).max()
    rates = [[rows_per_second(score, features, class_id, FLAGS.seconds)
              for score in (exported, reference)] for _ in range(FLAGS.repeats)]
    ours, numpy_rate = np.max(rates, axis=0)
    print(f"{batch:>6} {ours:>14,.0f} {numpy_rate:>14,.0f} {ours / numpy_rate:>13.2f} "
          f"{difference:>11.1e}")


def run():
  common.run(main)


if __name__ == "__main__":
  run()
