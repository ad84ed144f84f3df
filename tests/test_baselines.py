"""Tests of the detection baselines and the benchmark's markdown section."""

import dataclasses
import json
import os

from absl.testing import flagsaver
import numpy as np
import pytest

from cleannet_tf import baselines, data, detection, references, training
from cleannet_tf.errors import InputError
from tools import benchmark_detection

NUM_CLASSES = 3


def _problem(num_rows=300, dim=8, separation=4.0, verified_classes=(0, 1, 2), seed=0):
  """Synthetic rows: a clean row sits near its class's centre, a noisy one far.

  Returns (problem, truth of every row, verified training rows' mask).
  """
  rng = np.random.default_rng(seed)
  class_ids = rng.integers(0, NUM_CLASSES, num_rows)
  truth = (rng.random(num_rows) < 0.7).astype(np.int64)
  centres = rng.normal(size=(NUM_CLASSES, dim)) * separation
  # Mislabeled rows look like another class.
  source = np.where(truth == 1, class_ids, (class_ids + 1) % NUM_CLASSES)
  features = np.abs(centres[source] + rng.normal(size=(num_rows, dim)))
  labelled = np.isin(class_ids, verified_classes) & (rng.random(num_rows) < 0.3)
  train = np.flatnonzero(labelled)
  return (baselines.Problem(features.astype(np.float32), class_ids, train, truth[train],
                            NUM_CLASSES, seed), truth, labelled)


def _error(problem, truth, labelled, scores):
  """Average per-class error on unlabelled rows at a threshold chosen on labelled rows."""
  delta, _ = detection.select_threshold(problem.class_ids[labelled], truth[labelled],
                                        scores[labelled])
  rest = ~labelled
  return detection.average_per_class_error(problem.class_ids[rest], truth[rest],
                                           detection.decisions(scores[rest], delta))


def _unsupervised_methods(problem):
  references = np.abs(np.random.default_rng(1).normal(size=(NUM_CLASSES, 4, 8)))
  probabilities = np.random.default_rng(2).random((len(problem.class_ids), NUM_CLASSES))
  return {
      "naive": baselines.naive(problem),
      "average": baselines.average_baseline(problem, references, np.array([4, 2, 3])),
      "isolation forest": baselines.isolation_forest(problem),
      "classification filtering": baselines.classification_filtering(problem,
                                                                     probabilities),
  }


def test_every_baseline_gives_one_finite_score_per_row():
  problem, _, _ = _problem()
  scores = {**_unsupervised_methods(problem),
            **{name: method(problem) for name, method in baselines.SUPERVISED.items()}}
  for name, values in scores.items():
    assert values.shape == (300,), name
    assert np.isfinite(values).all(), name


@pytest.mark.parametrize("name", list(baselines.SUPERVISED))
def test_supervised_baselines_separate_separable_data(name):
  problem, truth, labelled = _problem()
  scores = baselines.SUPERVISED[name](problem)
  assert _error(problem, truth, labelled, scores) < 0.1


def test_classes_without_verified_rows_fall_back_to_naive():
  problem, _, _ = _problem(verified_classes=(0, 1))
  assert baselines.fallback_classes(problem).tolist() == [2]
  scores = baselines.mlp(problem)
  np.testing.assert_array_equal(scores[problem.class_ids == 2], 1.0)
  assert (scores[problem.class_ids != 2] < 1.0).any()


def test_single_label_class_gets_its_verified_clean_share():
  problem, _, _ = _problem()
  truth = np.where(problem.class_ids[problem.train] == 1, 0, problem.train_truth)
  problem = baselines.Problem(problem.features, problem.class_ids, problem.train, truth,
                              NUM_CLASSES)
  assert baselines.fallback_classes(problem).tolist() == [1]
  np.testing.assert_array_equal(baselines.knn(problem)[problem.class_ids == 1], 0.0)


def test_classification_filtering_is_minus_the_rank_of_the_noisy_label():
  problem = baselines.Problem(np.zeros((3, 2)), np.array([0, 1, 2]), np.array([0]),
                              np.array([1]), 3)
  probabilities = np.array([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [0.7, 0.2, 0.1]])
  np.testing.assert_array_equal(
      baselines.classification_filtering(problem, probabilities), [0, -1, -2])


def test_average_baseline_prefers_rows_near_their_references():
  features = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
  references = np.array([[[2.0, 0.0], [9.0, 9.0]], [[0.0, 3.0], [0.0, 0.0]]])
  problem = baselines.Problem(features, np.array([0, 0]), np.array([0]), np.array([1]), 2)
  # Class 0 has one real reference; its padding row must not count.
  scores = baselines.average_baseline(problem, references, np.array([1, 1]))
  np.testing.assert_allclose(scores, [1.0, 0.0], atol=1e-12)


def test_cleanlab_flags_rows_or_is_skipped():
  pytest.importorskip("cleanlab")
  problem, truth, labelled = _problem(num_rows=600)
  scores = baselines.cleanlab_issues(problem,
                                     baselines.cross_validated_probabilities(problem))
  assert set(np.unique(scores)) <= {0.0, 1.0}
  assert _error(problem, truth, labelled, scores) < 0.3


def _detection_result():
  method = {"val_error": 0.2, "error": 0.25, "delta": 0.1, "seconds": 1.0,
            "peak_rss_growth_mib": 3.0}
  return {
      "command": "python -m tools.benchmark_detection --run_dir=r", "seed": 0,
      "cleannet_steps": 10, "features": "r/features/all", "num_rows": 100,
      "class_names": ["a", "b"], "noise_rate": 0.4, "transfer_splits": 2,
      "full": {"methods": {"naive": method, "CleanNet": method}, "cleanlab_installed": True,
               "cleannet_repeat_errors": [0.25, 0.27, 0.23],
               "supervised_fallback_classes": [], "num_train_verified": 8,
               "num_val_verified": 2, "num_evaluated": 90},
      "transfer": {0: {"mean": {"naive": 0.4, "CleanNet": 0.25},
                       "std": {"naive": 0.0, "CleanNet": 0.0}},
                   1: {"mean": {"naive": 0.45, "CleanNet": 0.4},
                       "std": {"naive": 0.05, "CleanNet": 0.1}}},
      "ablation_transfer_n": 1, "ablation_seeds": 1,
      "ablation": {"defaults": {"description": "ours", "overrides": {}, "val_error": [0.2],
                                "error": [0.25], "transfer": [0.3, 0.5],
                                "held_out_verified": [0.1, 0.2]},
                   "paper": {"description": "theirs", "overrides": {"gamma": 0.1},
                             "val_error": [0.3], "error": [0.35], "transfer": [0.6, 0.6],
                             "held_out_verified": [0.4, 0.4]},
                   "dropout": {"description": "more", "overrides": {"dropout": 0.2},
                               "val_error": [0.25], "error": [0.3], "transfer": [0.5, 0.5],
                               "held_out_verified": [0.45, 0.45]}}}


def test_detection_markdown_has_every_table():
  text = benchmark_detection.markdown(_detection_result())
  assert "| naive | 20.00% | 25.00% | 0.1 | 1.0 | 3 MiB |" in text
  assert "| 0 | 40.00% ± 0.00% | 25.00% ± 0.00% |" in text
  assert ("| paper | theirs | gamma=0.1 | 30.00% | 40.00% ± 0.00% | 35.00% | "
          "60.00% ± 0.00% |") in text
  assert ("| defaults | ours | — | 20.00% | 15.00% ± 5.00% | 25.00% | "
          "40.00% ± 10.00% |") in text
  # Validation error ranks the variants as the evaluation error does; in
  # transfer the verified column swaps paper and dropout: 1 - 6 * 2 / 24.
  assert ("choosing among these 3 variants: Spearman rank correlation between the "
          "verified and the evaluation column, full supervision 1.00, transfer n=1 "
          "0.50.") in text
  assert "CleanNet over 3 runs with seeds 0..2 (same validation rows): error 25.00% ± 1.63% " \
         "(min 23.00%, max 27.00%)" in text
  assert "Table 2 and Fig. 5" in text and "trained 2 times" not in text


def test_seeded_ablation_markdown_gives_means_over_seeds():
  result = _detection_result()
  result["ablation_seeds"] = 2
  result["transfer"] = {0: result["transfer"][0]}  # full supervision only
  for variant in result["ablation"].values():
    variant["val_error"] = [variant["val_error"][0], variant["val_error"][0] + 0.1]
    variant["error"] = variant["error"] * 2
  text = benchmark_detection.markdown(result)
  assert text.startswith("## CleanNet variants over several seeds")
  assert "Every variant is trained 2 times, with seeds 0..1" in text
  assert ("| defaults | ours | — | 25.00% ± 5.00% | 15.00% ± 5.00% | 25.00% ± 0.00% | "
          "40.00% ± 10.00% |") in text
  # No class held out: no transfer table.
  assert "Transfer: verification labels" not in text


def test_rows_with_truth_marks_the_rows_whose_noisy_label_is_the_clean_one(tmp_path):
  names = [f"img{i}.png" for i in range(4)]
  data.write_features(str(tmp_path / "features"), [str(tmp_path / n) for n in names],
                      np.ones((4, 3), np.float32), [0, 1, 1, 0], [-1, 1, 0, -1], ["a", "b"])
  clean = tmp_path / "train.csv"
  clean.write_text("path,clean_label\n" + "".join(
      f"{n},{label}\n" for n, label in zip(names, "abab")))
  info, rows, truth = benchmark_detection.rows_with_truth(str(tmp_path / "features"),
                                                          str(clean))
  assert info.num_rows == 4
  by_key = dict(zip(rows["key"].astype(str), truth))
  assert [by_key[str(tmp_path / n)] for n in names] == [1, 1, 0, 0]


def test_held_out_verified_error_uses_only_the_held_out_classes_verified_rows():
  class_ids = np.array([0, 0, 0, 1, 1, 2, 2])
  verification = np.array([1, 0, -1, 1, 0, 1, 0])
  scores = np.array([0.9, 0.8, 0.0, 0.9, 0.1, 0.0, 0.9])
  # Class 0: its l=0 row scores above delta (error 1/2); class 1 is right;
  # class 2 is all wrong but not held out; the unverified row does not count.
  error = benchmark_detection.held_out_verified_error(scores, class_ids, verification,
                                                      np.array([0, 1]), 0.5)
  assert error == pytest.approx(0.25)


def test_every_ablation_is_a_valid_override():
  for description, overrides in benchmark_detection.ABLATIONS.values():
    assert description and overrides
    training.with_overrides({"dropout": 0.0}, training.TrainConfig(), overrides)


def test_detection_section_is_named_after_the_label_column(tmp_path):
  (tmp_path / "manifests.json").write_text('{"label_column": "aggre_label"}')
  assert benchmark_detection.section_name(str(tmp_path)) == "detection-aggre_label"
  assert benchmark_detection.section_name(str(tmp_path), "mine") == "mine"
  (tmp_path / "manifests.json").unlink()
  assert benchmark_detection.section_name(str(tmp_path)) == "detection"


def _benchmark_rows(tmp_path, num_rows=240, num_classes=4):
  """(rows, truth, feature set) of a small detection problem written to `tmp_path`."""
  rng = np.random.default_rng(0)
  class_ids = np.repeat(np.arange(num_classes), num_rows // num_classes)
  truth = (rng.random(num_rows) < 0.7).astype(np.int64)
  verification = np.where(rng.random(num_rows) < 0.4, truth, -1)
  features = rng.normal(size=(num_rows, 3)).astype(np.float32)
  features[:, 0] += truth  # informative but imperfect scores
  keys = np.array([f"k{i}" for i in range(num_rows)])
  info = data.write_features(str(tmp_path / "features"), keys, features, class_ids,
                             verification, [f"c{c}" for c in range(num_classes)])
  rows = {"key": keys, "features": features, "class_id": class_ids,
          "verification": verification}
  return rows, truth, info


def _record_cleannet_calls(monkeypatch, thresholds_of=None):
  """Replaces CleanNet training by its first feature; returns the calls' list.

  `thresholds_of` is the fake runs' (default: delta for every class).
  """
  calls = []

  def fake_cleannet_run(masked_info, reference_sets, model_dir, row_features,
                        row_class_ids, overrides=None):
    calls.append((model_dir, masked_info.directory, overrides))
    return (row_features[:, 0].astype(np.float64),
            thresholds_of or (lambda delta: np.full(masked_info.num_classes, delta)))

  monkeypatch.setattr(benchmark_detection, "cleannet_run", fake_cleannet_run)
  return calls


def test_transfer_and_ablation_report_held_out_verified_errors(tmp_path, monkeypatch):
  # Enough validation rows for the three threshold rules to disagree.
  rows, truth, info = _benchmark_rows(tmp_path, num_rows=800)
  class_ids, verification, features = rows["class_id"], rows["verification"], rows["features"]
  calls = _record_cleannet_calls(monkeypatch)
  scores = features[:, 0].astype(np.float64)
  full_results = {"naive": {"error": 0.3}, "MLP": {"error": 0.2, "delta": 0.5},
                  "CleanNet": {"error": 0.1, "val_error": 0.1}}
  full_scores = {"naive": np.ones(len(truth)), "MLP": scores}
  with flagsaver.flagsaver():
    benchmark_detection.FLAGS(["test", "--clean_labels=x", "--transfer_n=2",
                               "--transfer_splits=2",
                               "--ablations=dropout,minimum_threshold,exact_threshold_ties",
                               "--ablation_transfer_n=2"])
    report = benchmark_detection.transfer(rows, truth, None, full_scores, full_results,
                                          info, str(tmp_path / "out"))
    ablation = benchmark_detection.ablation(rows, truth, None, info, str(tmp_path / "out"))
    expected, expected_minimum, expected_exact = [], [], []
    deltas = {"calibrated": [], "minimum": [], "exact": []}
    for split in range(2):
      held_out, masked, evaluated, val, _ = benchmark_detection.held_out_split(
          rows, 2, split, info, str(tmp_path / "out"))
      # The defaults' threshold is the calibrated one; minimum_threshold's is
      # the lowest validation error with the tie band in transfer;
      # exact_threshold_ties' has no band.
      for name, rule, tie_band, errors in [("calibrated", "calibrated", None, expected),
                                           ("minimum", "minimum", None, expected_minimum),
                                           ("exact", "minimum", 0.0, expected_exact)]:
        delta = benchmark_detection.threshold_and_error(scores, class_ids, masked, val,
                                                        evaluated, truth, rule,
                                                        tie_band)["delta"]
        deltas[name].append(delta)
        delta = np.full(info.num_classes, delta)
        errors.append(benchmark_detection.held_out_verified_error(
            scores, class_ids, verification, held_out, delta))
  assert [run["cleannet_held_out_verified_error"] for run in report[2]["splits"]] == expected
  assert ablation["defaults"]["held_out_verified"] == expected
  assert ablation["dropout"]["held_out_verified"] == expected
  assert ablation["minimum_threshold"]["held_out_verified"] == expected_minimum
  assert ablation["exact_threshold_ties"]["held_out_verified"] == expected_exact
  # The data tell the three rules apart.
  assert len({tuple(values) for values in deltas.values()}) == 3
  assert expected_minimum != expected_exact
  assert (str(tmp_path / "out/transfer_n2_split1/cleannet-dropout"), {"dropout": 0.2}) in [
      (model_dir, overrides) for model_dir, _, overrides in calls]
  assert 0 < np.mean(expected) < 0.5


def test_transfer_decides_held_out_classes_at_cleannets_moved_thresholds(tmp_path, monkeypatch):
  rows, truth, info = _benchmark_rows(tmp_path)
  scores = rows["features"][:, 0].astype(np.float64)
  full_results = {"naive": {"error": 0.3}, "MLP": {"error": 0.2, "delta": 0.5},
                  "CleanNet": {"error": 0.1, "val_error": 0.1}}
  full_scores = {"naive": np.ones(len(truth)), "MLP": scores}
  # Every class's threshold 1 above delta: held-out classes are decided there.
  _record_cleannet_calls(monkeypatch, lambda delta: np.full(info.num_classes, delta + 1.0))
  with flagsaver.flagsaver():
    benchmark_detection.FLAGS(["test", "--clean_labels=x", "--transfer_n=2",
                               "--transfer_splits=1"])
    report = benchmark_detection.transfer(rows, truth, None, full_scores, full_results,
                                          info, str(tmp_path / "out"))
    held_out, masked, evaluated, val, _ = benchmark_detection.held_out_split(
        rows, 2, 0, info, str(tmp_path / "out"))
    delta = benchmark_detection.threshold_and_error(scores, rows["class_id"], masked, val,
                                                    evaluated, truth)["delta"]
  moved = detection.average_per_class_error(
      rows["class_id"][evaluated], truth[evaluated],
      detection.decisions(scores[evaluated], delta + 1.0))
  at_delta = detection.average_per_class_error(
      rows["class_id"][evaluated], truth[evaluated],
      detection.decisions(scores[evaluated], delta))
  assert moved != at_delta
  assert report[2]["splits"][0]["errors"]["CleanNet"] == pytest.approx(moved)


@pytest.mark.parametrize("ablation_seeds, num_runs", [
    # 1 repeat, 2 transfer splits, 3 ablations x (full + 2 splits).
    (1, 12),
    # And per ablation, defaults included, seed 1's full and transfer runs;
    # the defaults' seed 1 full run is the repeat.
    (2, 23)])
def test_cleannet_runs_are_the_runs_the_tables_train_but_the_timed_one(
    tmp_path, monkeypatch, ablation_seeds, num_runs):
  rows, truth, info = _benchmark_rows(tmp_path)
  reference_sets = references.build_kmeans_references(rows["features"], rows["class_id"],
                                                      info.num_classes, k=2, seed=0)
  calls = _record_cleannet_calls(monkeypatch)
  call_references = {}
  recorded_run = benchmark_detection.cleannet_run

  def run_keeping_references(masked_info, run_references, model_dir, *args, **kwargs):
    call_references[model_dir] = run_references
    return recorded_run(masked_info, run_references, model_dir, *args, **kwargs)

  monkeypatch.setattr(benchmark_detection, "cleannet_run", run_keeping_references)
  out = str(tmp_path / "out")
  probabilities = np.random.default_rng(1).random((len(truth), info.num_classes))
  with flagsaver.flagsaver():
    benchmark_detection.FLAGS(["test", "--clean_labels=x", "--transfer_n=0,2",
                               "--transfer_splits=2", "--ablations=dropout,sgd,references_20",
                               "--ablation_transfer_n=2", "--cleannet_repeats=2",
                               "--cleannet_steps=6", f"--ablation_seeds={ablation_seeds}"])
    full, scores = benchmark_detection.full_supervision(
        rows, truth, reference_sets, lambda: probabilities, info, out)
    report = benchmark_detection.transfer(rows, truth, reference_sets, scores,
                                          full["methods"], info, out)
    ablation = benchmark_detection.ablation(rows, truth, reference_sets, info, out)
    planned = benchmark_detection.cleannet_runs(rows, reference_sets, info, out)
    trained = {model_dir: (features_dir, benchmark_detection.cleannet_settings(
        data.read_info(features_dir), reference_sets, overrides))
               for model_dir, features_dir, overrides in calls}
  # The timed full-supervision run trains in the table, alone.
  assert trained.pop(os.path.join(out, "cleannet"))[0] == info.directory
  assert len(planned) == len(trained) == num_runs
  for run in planned:
    features_dir, (model_config, config) = trained[run.model_dir]
    assert (run.features_dir, run.model_config, run.config) == (features_dir, model_config,
                                                                 config)
    # A K ablation trains on K-means sets of its own K, in the table and before it.
    assert run.references.k == run.model_config["num_references"]
    np.testing.assert_array_equal(run.references.features,
                                  call_references[run.model_dir].features)
  assert {run.config.seed for run in planned} == {0, 1}
  assert {run.model_config["dropout"] for run in planned} == {0.0, 0.2}
  assert {run.model_config["num_references"] for run in planned} == {2, 20}
  k20 = references.ReferenceSets.load(os.path.join(out, "references-k20.npz"))
  assert k20.k == 20 and list(k20.counts) == [20] * info.num_classes
  with flagsaver.flagsaver(ablations=[], transfer_n=["0"], cleannet_repeats=2):
    # Without ablations, nothing of theirs (nor the defaults' transfer) is trained.
    assert [run.model_dir for run in benchmark_detection.cleannet_runs(
        rows, reference_sets, info, out)] == [os.path.join(out, "cleannet-seed1")]
  assert all(len(variant["val_error"]) == ablation_seeds
             and len(variant["transfer"]) == 2 * ablation_seeds
             for variant in ablation.values())
  # The defaults' seed 0 runs are the tables'.
  assert ablation["defaults"]["error"][0] == full["methods"]["CleanNet"]["error"]
  assert ablation["defaults"]["transfer"][:2] == [
      split["errors"]["CleanNet"] for split in report[2]["splits"]]


@pytest.mark.slow
def test_train_in_processes_trains_each_run_once_and_raises_failures(tmp_path):
  rows, _, info = _benchmark_rows(tmp_path)
  reference_sets = references.build_kmeans_references(rows["features"], rows["class_id"],
                                                      info.num_classes, k=2, seed=0)
  model_config = dict(num_classes=info.num_classes, num_references=2, feature_dim=3,
                      query_hidden_dim=4, embedding_dim=4, reference_hidden_dims=(4, 4),
                      attention_dim=4)
  config = training.TrainConfig(steps=4, global_batch_size=8, eval_every=2,
                                checkpoint_every=2, log_every=2, shuffle_buffer=16)
  runs = [training.TrainingRun(model_config, reference_sets, info.directory,
                               str(tmp_path / f"run{seed}"),
                               dataclasses.replace(config, seed=seed)) for seed in range(3)]
  training.train_in_processes(runs, workers=2)
  summaries = [tmp_path / f"run{seed}" / "summary.json" for seed in range(3)]
  finished = [path.stat().st_mtime_ns for path in summaries]
  assert [json.loads(path.read_text())["config"]["seed"] for path in summaries] == [0, 1, 2]
  # Finished runs are skipped; a failing run's error reaches the caller.
  broken = dataclasses.replace(runs[0], features_dir=str(tmp_path / "missing"),
                               model_dir=str(tmp_path / "broken"))
  with pytest.raises(InputError, match="missing"):
    training.train_in_processes(runs + [broken, broken], workers=2)
  assert [path.stat().st_mtime_ns for path in summaries] == finished
