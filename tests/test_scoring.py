"""Scoring a feature set: every row out, resumable shards, the score tool."""

import os
import subprocess
import sys

import keras
import numpy as np

from cleannet_tf import data, detection, scoring
from cleannet_tf import model as model_lib

NUM_CLASSES, DIM = 3, 5


def small_model(delta=0.2):
  keras.utils.set_random_seed(0)
  model = model_lib.CleanNet(NUM_CLASSES, 2, DIM, query_hidden_dim=8, embedding_dim=4,
                             reference_hidden_dims=(8, 6), attention_dim=4)
  rng = np.random.default_rng(0)
  model.reference_features.assign(rng.random((NUM_CLASSES, 2, DIM)).astype("float32"))
  model.reference_counts.assign(np.array([2, 1, 2], "int32"))
  model.delta.assign(delta)
  return model


def feature_set(directory, n=23):
  rng = np.random.default_rng(1)
  return data.write_features(
      str(directory), np.array([f"img/{i}.jpg" for i in range(n)]),
      rng.random((n, DIM)).astype(np.float32), rng.integers(0, NUM_CLASSES, n),
      rng.integers(-1, 2, n), ["cat", "dog", "fish"], rows_per_shard=10)


def read_table(paths):
  lines = [line.rstrip("\n").split("\t") for path in paths
           for line in open(path, encoding="utf-8").readlines()[1:]]
  return {name: [row[i] for row in lines] for i, name in enumerate(scoring.SCORE_COLUMNS)}


def test_every_row_is_scored_with_its_key_and_weights(tmp_path):
  model, info = small_model(), feature_set(tmp_path / "features")
  summary = scoring.score_feature_set(model, info, str(tmp_path / "scores"), batch_size=4)
  assert len(summary.outputs) == len(info.shard_paths) == 3
  table = read_table(summary.outputs)
  rows = data.load_arrays(info, verification="all")
  assert table["key"] == [k.decode() for k in rows["key"]]
  assert table["class_name"] == [info.class_names[c] for c in rows["class_id"]]
  expected = model({"features": rows["features"], "class_id": rows["class_id"]})["score"]
  np.testing.assert_allclose(np.array(table["score"], float), expected, atol=2e-6)
  w_soft, w_hard = detection.sample_weights(np.array(table["score"], float), 0.2)
  np.testing.assert_allclose(np.array(table["w_soft"], float), w_soft, atol=1e-6)
  assert np.array(table["w_hard"], int).tolist() == w_hard.astype(int).tolist()
  assert table["is_clean"] == table["w_hard"]
  assert summary.rows == info.num_rows
  assert summary.flagged == int((w_hard == 0).sum())
  assert len(summary.verified_arrays()["score"]) == info.num_verified


def test_rerun_skips_finished_shards_and_reports_the_same(tmp_path):
  model, info = small_model(), feature_set(tmp_path / "features")
  out = str(tmp_path / "scores")
  first = scoring.score_feature_set(model, info, out)
  finished = first.outputs[0]
  os.remove(first.outputs[1])  # as if killed while writing the second shard
  before = os.path.getmtime(finished)
  second = scoring.score_feature_set(model, info, out)
  assert os.path.getmtime(finished) == before
  assert (second.rows, second.flagged) == (first.rows, first.flagged)
  assert not [name for name in os.listdir(out) if name.endswith(".tmp")]


def test_score_tool_prints_metrics_and_rejects_mismatched_model(tmp_path):
  model, info = small_model(), feature_set(tmp_path / "features")
  model.save(str(tmp_path / "model.keras"))
  command = [sys.executable, "-m", "tools.score", f"--model={tmp_path / 'model.keras'}",
             f"--features={info.directory}", f"--output_dir={tmp_path / 'scores'}"]
  result = subprocess.run(command, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  assert '"rows": 23' in result.stdout and "avg_class_error" in result.stdout
  other = data.write_features(str(tmp_path / "wide"), np.array(["a"]),
                              np.ones((1, DIM + 1), np.float32), np.array([0]),
                              np.array([1]), ["cat", "dog", "fish"])
  command[4] = f"--features={other.directory}"
  result = subprocess.run(command, capture_output=True, text=True)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "6-d features" in last and "Traceback" not in result.stderr


def test_class_without_verification_labels_is_decided_at_its_moved_threshold(tmp_path):
  model, info = small_model(), feature_set(tmp_path / "features", n=60)
  rows = data.load_arrays(info, verification="all")
  scores = scoring.Scorer(model).score(rows["features"], rows["class_id"])
  scoring.set_class_score_quartiles(model, info, [1, 0, 1])
  for c in range(NUM_CLASSES):
    expected = np.percentile(scores[rows["class_id"] == c], [25, 50, 75])
    np.testing.assert_allclose(model.score_quartiles.numpy()[c], expected, atol=0.01)
  thresholds = scoring.class_thresholds(model)
  np.testing.assert_allclose(thresholds[[0, 2]], 0.2)
  assert abs(thresholds[1] - 0.2) > 1e-3
  np.testing.assert_allclose(
      thresholds, detection.class_thresholds(0.2, model.score_quartiles.numpy(), [1, 0, 1]))
  summary = scoring.score_feature_set(model, info, str(tmp_path / "scores"))
  table = read_table(summary.outputs)
  _, w_hard = detection.sample_weights(np.array(table["score"], float),
                                       thresholds[rows["class_id"]])
  assert np.array(table["is_clean"], int).tolist() == w_hard.astype(int).tolist()
  assert summary.flagged == int((w_hard == 0).sum())
