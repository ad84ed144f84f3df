"""Scoring throughput of the exported SavedModel beside NumPy doing the same math.

  python -m tools.benchmark_export [--feature_dim=2048 --num_classes=1000 \
      --batch_sizes=1,64,4096 --seconds=2] [--out=DIR] [--benchmarks_md=BENCHMARKS.md]

Builds a CleanNet with random weights (throughput does not depend on them),
exports it, loads the SavedModel and times ``serving_default`` against a NumPy
implementation of the serving math with the Keras model's weights: log1p
normalisation, the query encoder's two tanh layers, and the cosine to the
precomputed class embedding of each row's class. Both see the same inputs in
the same run, in alternating timing windows of which the best counts (on a
shared machine the others measure its load); the table also shows their largest
score difference.

With --out, writes <out>/export_benchmark.json and <out>/export.png (with
matplotlib); with --benchmarks_md, regenerates that file's section between its
``export`` markers.
"""

import json
import os
import shlex
import sys
import tempfile
import time

from absl import flags
import numpy as np
import tensorflow as tf

from tools import common, markdown_sections
from cleannet_tf import data, export
from cleannet_tf import model as model_lib

flags.DEFINE_integer("feature_dim", 2048, "D, the feature width.")
flags.DEFINE_integer("num_classes", 1000, "L, the number of classes.")
flags.DEFINE_integer("num_references", 4,
                     "K; only the export-time class embeddings depend on it.")
flags.DEFINE_integer("query_hidden_dim", model_lib.QUERY_HIDDEN_DIM,
                     "Query encoder hidden width.")
flags.DEFINE_integer("embedding_dim", model_lib.EMBEDDING_DIM, "E, the embedding width.")
flags.DEFINE_list("batch_sizes", ["1", "64", "4096"], "Batch sizes to time.")
flags.DEFINE_float("seconds", 1.0, "Length of one timing window.")
flags.DEFINE_integer("repeats", 3, "Timing windows per batch size and implementation; the "
                     "best counts.")
flags.DEFINE_integer("seed", 0, "Seed of the random weights and inputs.")
flags.DEFINE_string("out", "", "Folder for export_benchmark.json and export.png; empty: none.")
flags.DEFINE_string("benchmarks_md", "",
                    "Markdown file whose export section is regenerated; empty: none.")
FLAGS = flags.FLAGS
SECTION = "export"


def random_model(rng):
  model = model_lib.CleanNet(
      FLAGS.num_classes, FLAGS.num_references, FLAGS.feature_dim,
      query_hidden_dim=FLAGS.query_hidden_dim, embedding_dim=FLAGS.embedding_dim)
  model.reference_features.assign(rng.random(
      (FLAGS.num_classes, FLAGS.num_references, FLAGS.feature_dim), np.float32))
  model.reference_counts.assign(np.full([FLAGS.num_classes], FLAGS.num_references, np.int32))
  model.normalize.set_statistics(rng.random(FLAGS.feature_dim, np.float32),
                                 1.0 + rng.random(FLAGS.feature_dim, np.float32))
  return model


def numpy_scorer(model):
  """The serving math in NumPy: (features [N, D], class_id [N]) -> scores [N]."""
  hidden, embedding = model.query_encoder.encoder_hidden, model.query_encoder.encoder_embedding
  w1, b1 = hidden.kernel.numpy(), hidden.bias.numpy()
  w2, b2 = embedding.kernel.numpy(), embedding.bias.numpy()
  mean, std = model.normalize.mean.numpy(), model.normalize.std.numpy()
  classes = model.class_embeddings()[0].numpy()
  classes /= np.linalg.norm(classes, axis=1, keepdims=True)

  def score(features, class_id):
    normalized = (np.sign(features) * np.log1p(np.abs(features)) - mean) / std
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


def benchmark(batch_sizes, seconds, repeats, seed=0):
  """Times the export and NumPy at each batch size; returns the result dict.

  The model's shape comes from the flags (--feature_dim, --num_classes,
  --num_references, --query_hidden_dim, --embedding_dim).
  """
  rng = np.random.default_rng(seed)
  model = random_model(rng)
  with tempfile.TemporaryDirectory() as root:
    names = [f"class{i}" for i in range(FLAGS.num_classes)]
    loaded = tf.saved_model.load(export.export_savedmodel(model, names, root))
  serving = loaded.signatures[export.SCORE_SIGNATURE]

  def exported(features, class_id):
    return serving(features=tf.constant(features), class_id=tf.constant(class_id))["score"]

  reference = numpy_scorer(model)
  rows = []
  for batch in batch_sizes:
    # Non-negative, as pooled ReLU features are.
    features = rng.random((batch, FLAGS.feature_dim), np.float32) * 4
    class_id = rng.integers(0, FLAGS.num_classes, batch)
    difference = np.abs(exported(features, class_id).numpy()
                        - reference(features, class_id)).max()
    rates = [[rows_per_second(score, features, class_id, seconds)
              for score in (exported, reference)] for _ in range(repeats)]
    ours, numpy_rate = np.max(rates, axis=0)
    rows.append({"batch": batch, "export_rows_per_second": float(ours),
                 "numpy_rows_per_second": float(numpy_rate),
                 "max_abs_difference": float(difference)})
  return {"seed": seed, "feature_dim": FLAGS.feature_dim, "num_classes": FLAGS.num_classes,
          "num_references": FLAGS.num_references, "embedding_dim": FLAGS.embedding_dim,
          "query_hidden_dim": FLAGS.query_hidden_dim,
          "device": tf.config.list_logical_devices()[-1].name,
          "seconds_per_window": seconds, "repeats": repeats, "rows": rows}


def markdown(result):
  """The BENCHMARKS.md section of a benchmark result (with its "command")."""
  lines = [
      "## Serving: exported SavedModel against NumPy",
      f"Command: `{result['command']}` (seed {result['seed']}; "
      f"D={result['feature_dim']} features, L={result['num_classes']} classes, "
      f"E={result['embedding_dim']}, hidden width {result['query_hidden_dim']}, random "
      "weights; the same math in NumPy from the Keras model's weights, in the same run, "
      f"on {result['device']}; best of {result['repeats']} windows of "
      f"{result['seconds_per_window']:g} s). Rows/s of scoring (feature normalisation, "
      "query encoder, cosine against the precomputed class embeddings):", "",
      "| batch | export rows/s | NumPy rows/s | export / NumPy |", "|---|---|---|---|"]
  for row in result["rows"]:
    ours, theirs = row["export_rows_per_second"], row["numpy_rows_per_second"]
    lines.append(f"| {row['batch']} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f} |")
  smallest = min(result["rows"], key=lambda row: row["batch"])
  lines += [
      "",
      "Scores agree to "
      + f"{max(row['max_abs_difference'] for row in result['rows']):.0e}".replace("e-0", "e-")
      + f". At batch "
      f"{smallest['batch']} one call into the SavedModel signature from Python takes "
      f"{1000 * smallest['batch'] / smallest['export_rows_per_second']:.2f} ms (NumPy "
      f"{1000 * smallest['batch'] / smallest['numpy_rows_per_second']:.2f} ms), which "
      "dominates small batches; TF Serving's C++ server has its own, different "
      "per-request cost, and its server-side batching (`export/batching_parameters.txt`) "
      "groups small requests into large batches. Numbers on a busy machine vary "
      "between runs; the ratio within one run is the figure to read."]
  return "\n".join(lines) + "\n"


def plot(result, path):
  """Rows/s of both implementations against the batch size, as a PNG."""
  plt = markdown_sections.pyplot("export plot")
  if plt is None:
    return None
  batches = [row["batch"] for row in result["rows"]]
  figure, axes = plt.subplots(figsize=(6, 3.5))
  for key, label in [("export_rows_per_second", "exported SavedModel"),
                     ("numpy_rows_per_second", "NumPy")]:
    axes.plot(batches, [row[key] for row in result["rows"]], marker="o", label=label)
  axes.set_xscale("log")
  axes.set_yscale("log")
  axes.set_xticks(batches, [str(batch) for batch in batches])
  axes.set_xticks([], minor=True)
  axes.set_xlabel("batch size (rows)")
  axes.set_ylabel("rows scored per second")
  axes.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)
  return path


def main(_):
  result = benchmark([int(b) for b in FLAGS.batch_sizes], FLAGS.seconds, FLAGS.repeats,
                     FLAGS.seed)
  result["command"] = "python -m tools.benchmark_export " + shlex.join(sys.argv[1:])
  print(f"D={FLAGS.feature_dim} L={FLAGS.num_classes} E={FLAGS.embedding_dim} "
        f"hidden={FLAGS.query_hidden_dim} device={result['device']}")
  print(f"{'batch':>6} {'export rows/s':>14} {'numpy rows/s':>14} {'export/numpy':>13} "
        f"{'max |diff|':>11}")
  for row in result["rows"]:
    ours, numpy_rate = row["export_rows_per_second"], row["numpy_rows_per_second"]
    print(f"{row['batch']:>6} {ours:>14,.0f} {numpy_rate:>14,.0f} {ours / numpy_rate:>13.2f} "
          f"{row['max_abs_difference']:>11.1e}")
  if FLAGS.out:
    os.makedirs(FLAGS.out, exist_ok=True)
    data.atomic_write_text(os.path.join(FLAGS.out, "export_benchmark.json"),
                           json.dumps(result, indent=2) + "\n")
    plot(result, os.path.join(FLAGS.out, "export.png"))
  if FLAGS.benchmarks_md:
    markdown_sections.update_file(FLAGS.benchmarks_md, SECTION, markdown(result))


def run():
  common.run(main)


if __name__ == "__main__":
  run()
