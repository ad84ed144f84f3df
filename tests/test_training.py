"""The training loop: strategies, resume, validation, the written model."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from cleannet_tf import data, detection, distribute, model as model_lib, references, training
from cleannet_tf.errors import InputError

NUM_CLASSES, DIM = 4, 8
MODEL_CONFIG = dict(num_classes=NUM_CLASSES, num_references=3, feature_dim=DIM,
                    query_hidden_dim=16, embedding_dim=8, reference_hidden_dims=(16, 8),
                    attention_dim=8)


def make_feature_set(directory, n=160, verified_share=0.5, seed=0, imbalance=False):
  """Class blobs with 25% wrong labels; ``verified_share`` of rows verified."""
  rng = np.random.default_rng(seed)
  true = rng.integers(0, NUM_CLASSES, n)
  if imbalance:
    true = np.minimum(rng.geometric(0.5, n) - 1, NUM_CLASSES - 1)
  noisy = np.where(rng.random(n) < 0.25, rng.integers(0, NUM_CLASSES, n), true)
  centres = rng.random((NUM_CLASSES, DIM)) * 3
  features = np.abs(centres[true] + rng.normal(scale=0.3, size=(n, DIM))).astype(np.float32)
  verification = np.where(rng.random(n) < verified_share, (noisy == true).astype(int), -1)
  keys = np.array([f"row-{i}" for i in range(n)])
  return data.write_features(str(directory), keys, features, noisy, verification,
                             [f"c{c}" for c in range(NUM_CLASSES)], rows_per_shard=64)


def reference_sets(info):
  rows = data.load_arrays(info, verification="all")
  return references.build_kmeans_references(rows["features"], rows["class_id"], NUM_CLASSES,
                                            k=3, seed=0)


def config(**overrides):
  base = dict(steps=6, global_batch_size=8, eval_every=3, checkpoint_every=3, log_every=3,
              shuffle_buffer=32, lr_decay_steps=4)
  return training.TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def feature_set(tmp_path_factory):
  return make_feature_set(tmp_path_factory.mktemp("features"))


def weights_of(model):
  return [np.asarray(w) for w in model.trainable_weights]


# The class separation penalty over all classes, and over a sample of them;
# the moving average of the weights.
@pytest.mark.parametrize("overrides", [{}, {"class_separation": 1.0, "separation_classes": 2},
                                       {"weight_averaging": 0.0}])
def test_mirrored_strategy_matches_default_strategy(feature_set, tmp_path, two_cpu_strategy,
                                                    overrides):
  refs = reference_sets(feature_set)
  keras.utils.set_random_seed(0)
  # Without XLA, which samples the separation classes with other numbers.
  single = training.Trainer(MODEL_CONFIG, refs, feature_set, str(tmp_path / "a"),
                            config(**overrides), jit_compile=False)
  mirrored = training.Trainer(MODEL_CONFIG, refs, feature_set, str(tmp_path / "b"),
                              config(**overrides), strategy=two_cpu_strategy)
  assert mirrored.strategy.num_replicas_in_sync == 2
  mirrored.model.set_weights(single.model.get_weights())
  if single.averaged_model is not None:
    mirrored.averaged_model.set_weights(single.averaged_model.get_weights())
  batches = [next(single.iterator) for _ in range(4)]
  single_metrics = single.train_steps(batches)
  mirrored_metrics = mirrored.train_steps(batches)
  for a, b in zip(single_metrics, mirrored_metrics):
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
  for a, b in zip(weights_of(single.selected_model), weights_of(mirrored.selected_model)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert not np.allclose(weights_of(single.model)[0],
                         weights_of(training.Trainer(
                             MODEL_CONFIG, refs, feature_set, str(tmp_path / "c"),
                             config()).model)[0])


def test_next_stop_is_the_first_log_eval_checkpoint_or_last_step():
  settings = config(steps=25, log_every=4, eval_every=10, checkpoint_every=6)
  stops, step = [], 0
  while step < settings.steps:
    step = training.next_stop(step, settings)
    stops.append(step)
  assert stops == [4, 6, 8, 10, 12, 16, 18, 20, 24, 25]


# Looping steps inside one call changes nothing but the speed: with and
# without XLA, and across replicas.
@pytest.mark.parametrize("variant", ["xla", "no_xla", "mirrored"])
@pytest.mark.slow
def test_looped_steps_match_one_call_a_step(feature_set, tmp_path, two_cpu_strategy, variant):
  refs = reference_sets(feature_set)
  settings = config(class_separation=1.0, separation_classes=2)
  one_a_step = training.Trainer(MODEL_CONFIG, refs, feature_set, str(tmp_path / "a"),
                                settings, jit_compile=variant == "xla")
  looped = training.Trainer(
      MODEL_CONFIG, refs, feature_set, str(tmp_path / "b"), settings,
      strategy=two_cpu_strategy if variant == "mirrored" else None,
      jit_compile=variant == "xla")
  looped.model.set_weights(one_a_step.model.get_weights())
  looped.averaged_model.set_weights(one_a_step.averaged_model.get_weights())
  for _ in range(5):
    last = one_a_step.run_steps(1)
  looped_last = looped.run_steps(5)
  assert one_a_step.step == looped.step == 5
  assert float(looped_last["loss"]) == pytest.approx(float(last["loss"]), rel=1e-5)
  for a, b in zip(weights_of(one_a_step.selected_model), weights_of(looped.selected_model)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_xla_compiles_the_same_loss_and_only_without_a_strategy_or_dropout(
    feature_set, tmp_path, two_cpu_strategy):
  refs = reference_sets(feature_set)
  compiled = training.Trainer(MODEL_CONFIG, refs, feature_set, str(tmp_path / "a"), config())
  plain = training.Trainer(MODEL_CONFIG, refs, feature_set, str(tmp_path / "b"), config(),
                           jit_compile=False)
  assert compiled.jit_compile and not plain.jit_compile
  # The first step's loss is that of the same initial weights and batch.
  assert float(compiled.run_steps(1)["loss"]) == pytest.approx(
      float(plain.run_steps(1)["loss"]), rel=1e-5)
  mirrored = training.Trainer(MODEL_CONFIG, refs, feature_set, str(tmp_path / "c"), config(),
                              strategy=two_cpu_strategy)
  assert not mirrored.jit_compile
  with_dropout = training.Trainer(dict(MODEL_CONFIG, dropout=0.2), refs, feature_set,
                                  str(tmp_path / "d"), config())
  assert not with_dropout.jit_compile
  assert distribute.is_default(tf.distribute.get_strategy())
  with two_cpu_strategy.scope():
    assert not distribute.is_default(tf.distribute.get_strategy())


# Adam with the moving average (the defaults), and SGD's momentum on the raw weights.
@pytest.mark.parametrize("overrides", [{"optimizer": "adam"},
                                       {"optimizer": "sgd", "weight_averaging": 0.0}])
@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(feature_set, tmp_path, overrides):
  refs = reference_sets(feature_set)

  def run(directory, steps):
    keras.utils.set_random_seed(0)
    trainer = training.Trainer(MODEL_CONFIG, refs, feature_set, str(directory),
                               config(steps=steps, **overrides))
    trainer.train()
    return trainer

  run(tmp_path / "resumed", 3)
  resumed = run(tmp_path / "resumed", 6)
  straight = run(tmp_path / "straight", 6)
  assert resumed.step == straight.step == 6
  for a, b in zip(weights_of(resumed.selected_model), weights_of(straight.selected_model)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_weight_averaging_is_an_exponential_moving_average_of_the_steps(feature_set, tmp_path):
  keras.utils.set_random_seed(0)
  decay = 0.5
  trainer = training.Trainer(MODEL_CONFIG, reference_sets(feature_set), feature_set,
                             str(tmp_path), config(weight_averaging=decay))
  expected = weights_of(trainer.model)
  for step in range(4):
    trainer.train_steps([next(trainer.iterator)])
    # Warm-up as tf.train.ExponentialMovingAverage: min(d, (1 + t) / (10 + t)),
    # t the optimizer's step count after the update.
    rate = min(decay, (2.0 + step) / (11.0 + step))
    expected = [rate * e + (1.0 - rate) * w for e, w in zip(expected, weights_of(trainer.model))]
  for got, want in zip(weights_of(trainer.averaged_model), expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(weights_of(trainer.averaged_model)[0], weights_of(trainer.model)[0])
  # What is validated and saved is the average.
  assert trainer.scorer.model is trainer.averaged_model


def test_training_writes_a_keras_model_that_scores_alike_in_a_fresh_process(
    feature_set, tmp_path):
  keras.utils.set_random_seed(0)
  trainer = training.Trainer(MODEL_CONFIG, reference_sets(feature_set), feature_set,
                             str(tmp_path), config())
  result = trainer.train()
  for name in ("model.keras", "best.keras", "summary.json"):
    assert os.path.exists(tmp_path / name)
  with open(tmp_path / "summary.json", encoding="utf-8") as summary:
    separation = json.load(summary)["class_embeddings"]
  assert set(separation) == {"closest_pair", "closest_cosine", "coinciding_classes"}
  assert os.listdir(tmp_path / "tensorboard")
  rows = data.load_arrays(feature_set, verification="all")
  from cleannet_tf import scoring
  expected = scoring.Scorer(result.model).score(rows["features"], rows["class_id"])
  np.save(tmp_path / "features.npy", rows["features"])
  np.save(tmp_path / "class_id.npy", rows["class_id"])
  np.save(tmp_path / "expected.npy", expected)
  script = textwrap.dedent(f"""
      import numpy as np, keras
      import cleannet_tf  # noqa: registers the model classes
      import cleannet_tf.model
      d = {str(tmp_path)!r}
      model = keras.models.load_model(d + "/model.keras")
      got = model({{"features": np.load(d + "/features.npy"),
                    "class_id": np.load(d + "/class_id.npy")}})["score"]
      np.testing.assert_allclose(got, np.load(d + "/expected.npy"), rtol=1e-5, atol=1e-6)
      print("ok", float(model.delta))
  """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
  assert out.stdout.startswith("ok"), out.stderr[-2000:]
  assert float(out.stdout.split()[1]) == pytest.approx(result.best_metrics["delta"], abs=1e-6)


def test_reference_refinement_trains_again_on_the_rows_scoring_above_delta(
    feature_set, tmp_path):
  from cleannet_tf import scoring
  original = reference_sets(feature_set)
  result = training.Trainer(MODEL_CONFIG, original, feature_set, str(tmp_path),
                            config(reference_refinement=1)).train()
  with open(tmp_path / "summary.json", encoding="utf-8") as summary:
    (refinement,) = json.load(summary)["reference_refinement"]
  # The first round is the run without refinement, in its own directory.
  first = keras.models.load_model(tmp_path / "unrefined" / "model.keras")
  alone = training.Trainer(MODEL_CONFIG, original, feature_set, str(tmp_path / "alone"),
                           config()).train().model
  for got, wanted in zip(weights_of(first), weights_of(alone)):
    np.testing.assert_allclose(got, wanted, rtol=1e-6)
  assert refinement["delta"] == pytest.approx(float(first.delta.numpy()))
  # Its rows at or above delta, K-means per class; a class keeping fewer than K
  # rows keeps its set.
  rows = data.load_arrays(feature_set, verification="all")
  above = scoring.Scorer(first).score(rows["features"], rows["class_id"]) >= refinement["delta"]
  kept = np.bincount(rows["class_id"][above], minlength=NUM_CLASSES)
  assert list(refinement["rows_kept"].values()) == kept.tolist()
  assert 0 < above.sum() < len(above)
  expected = references.build_kmeans_references(rows["features"][above],
                                                rows["class_id"][above], NUM_CLASSES, k=3)
  for model in (result.model, keras.models.load_model(tmp_path / "model.keras")):
    for c in range(NUM_CLASSES):
      wanted = expected.features[c] if kept[c] >= 3 else original.features[c]
      np.testing.assert_allclose(model.reference_features.numpy()[c], wanted, rtol=1e-5,
                                 atol=1e-5)
  # The second round trained from the same initial weights on other references.
  assert not np.allclose(weights_of(result.model)[0], weights_of(first)[0])


@pytest.mark.parametrize("transfer_thresholds", [True, False])
def test_classes_without_verification_labels_get_thresholds_moved_by_their_quartiles(
    tmp_path, transfer_thresholds):
  full = make_feature_set(tmp_path / "full")
  rows = data.load_arrays(full, verification="all")
  # Class 3's verification labels hidden: it transfers.
  masked = np.where(rows["class_id"] == 3, -1, rows["verification"])
  info = data.write_features(str(tmp_path / "masked"), rows["key"], rows["features"],
                             rows["class_id"], masked, full.class_names)
  result = training.Trainer(MODEL_CONFIG, reference_sets(info), info, str(tmp_path / "run"),
                            config(transfer_thresholds=transfer_thresholds)).train()
  model = result.model
  from cleannet_tf import scoring
  scores = scoring.Scorer(model).score(rows["features"], rows["class_id"])
  for c in range(NUM_CLASSES):
    np.testing.assert_allclose(model.score_quartiles.numpy()[c],
                               np.percentile(scores[rows["class_id"] == c], [25, 50, 75]),
                               atol=0.02)
  thresholds = scoring.class_thresholds(model)
  delta = float(model.delta.numpy())
  np.testing.assert_allclose(thresholds[:3], delta)
  if transfer_thresholds:
    assert model.verified_classes.numpy().tolist() == [1, 1, 1, 0]
    assert thresholds[3] != pytest.approx(delta)
  else:
    assert model.verified_classes.numpy().tolist() == [1, 1, 1, 1]
    assert thresholds[3] == pytest.approx(delta)
  with open(tmp_path / "run" / "summary.json", encoding="utf-8") as summary:
    assert json.load(summary)["class_thresholds"] == pytest.approx(
        dict(zip(info.class_names, thresholds.tolist())))
  # The saved model holds them.
  saved = keras.models.load_model(tmp_path / "run" / "model.keras")
  np.testing.assert_allclose(scoring.class_thresholds(saved), thresholds, rtol=1e-6)


def test_feature_statistics_are_those_of_every_row_after_the_transform(feature_set):
  model = model_lib.CleanNet(**MODEL_CONFIG)
  training.set_feature_statistics(model, feature_set, batch_size=50)
  rows = data.load_arrays(feature_set, verification="all")
  transformed = np.log1p(rows["features"].astype(np.float64))
  np.testing.assert_allclose(model.normalize.mean.numpy(), transformed.mean(axis=0), rtol=1e-5)
  np.testing.assert_allclose(model.normalize.std.numpy(), transformed.std(axis=0), rtol=1e-4)
  unstandardized = model_lib.CleanNet(**MODEL_CONFIG, standardize_features=False)
  training.set_feature_statistics(unstandardized, feature_set)  # a no-op
  assert not unstandardized.normalize.weights


def test_no_verified_rows_is_a_one_line_error_naming_the_directory(tmp_path):
  info = make_feature_set(tmp_path / "unverified", verified_share=0.0)
  with pytest.raises(InputError, match="unverified.*no verified rows"):
    training.Trainer(MODEL_CONFIG, reference_sets(info), info, str(tmp_path / "m"), config())


def test_split_verified_is_stratified_and_disjoint():
  class_ids = np.repeat(np.arange(3), [10, 5, 1])
  train, val = training.split_verified(class_ids, 0.2, seed=0)
  assert not set(train) & set(val)
  assert len(train) + len(val) == len(class_ids)
  assert np.bincount(class_ids[val], minlength=3).tolist() == [2, 1, 0]


def test_unverified_queries_are_drawn_class_uniformly(tmp_path):
  info = make_feature_set(tmp_path / "imbalanced", n=800, verified_share=0.2, imbalance=True)
  counts = info.class_counts[:, 0]
  assert counts.max() / counts.sum() > 0.4  # one class holds over 40% of the rows
  rows = data.load_arrays(info, verification="verified")
  dataset = training.training_dataset(rows, info, config(shuffle_buffer=800), 4, 50)
  drawn = np.concatenate([unverified["class_id"].numpy()
                          for _, unverified in dataset.take(40)])
  share = np.bincount(drawn, minlength=NUM_CLASSES) / len(drawn)
  # Every class drawn roughly equally often, although one class dominates the
  # rows (the rarest class, below the 10th-percentile floor, is kept whole).
  assert share.max() < 0.3, share


def test_cross_class_negatives_repair_only_verified_correct_queries():
  batch = {"features": tf.zeros([6, 2]), "class_id": tf.constant([0, 1, 2, 3, 0, 1], tf.int64),
           "verification": tf.constant([1, 1, 1, 0, 0, 1], tf.int64)}
  convert = training._cross_class_negatives(NUM_CLASSES, 1.0, seed=0)
  out = convert(tf.constant(0, tf.int64), batch)
  was_correct = batch["verification"].numpy() == 1
  assert (out["verification"].numpy() == 0).all()
  moved = out["class_id"].numpy() != batch["class_id"].numpy()
  assert moved[was_correct].all() and not moved[~was_correct].any()
  assert ((out["class_id"].numpy() >= 0) & (out["class_id"].numpy() < NUM_CLASSES)).all()
  none = training._cross_class_negatives(NUM_CLASSES, 0.0, seed=0)(tf.constant(0, tf.int64),
                                                                    batch)
  np.testing.assert_array_equal(none["class_id"], batch["class_id"])


def test_cross_class_negatives_drawn_among_the_listed_neighbors():
  neighbors = np.array([[1, 2], [0, 3], [3, 0], [2, 1]])
  batch = {"features": tf.zeros([400, 2]),
           "class_id": tf.constant(np.arange(400) % NUM_CLASSES, tf.int64),
           "verification": tf.ones([400], tf.int64)}
  convert = training._cross_class_negatives(NUM_CLASSES, 1.0, seed=0, neighbors=neighbors)
  out = convert(tf.constant(0, tf.int64), batch)
  for source in range(NUM_CLASSES):
    drawn = out["class_id"].numpy()[batch["class_id"].numpy() == source]
    # Only the listed classes, each of them drawn.
    assert set(drawn) == set(neighbors[source]), (source, set(drawn))


def test_confusable_classes_are_the_nearest_reference_centroids():
  model = model_lib.CleanNet(**MODEL_CONFIG)
  rng = np.random.default_rng(0)
  # Classes 0 and 1 share a region, 2 and 3 another.
  centres = np.array([[5.0] * 4 + [0.0] * 4, [4.5] * 4 + [0.0] * 4,
                      [0.0] * 4 + [5.0] * 4, [0.0] * 4 + [4.0] * 4])
  features = np.abs(centres[:, None, :] + rng.normal(scale=0.1, size=(NUM_CLASSES, 3, DIM)))
  # Class 3 has one reference. Standardised, its zero padding rows would sit
  # near classes 0 and 1 and pull its centroid there unless masked.
  features[3, 1:] = 0.0
  model.set_reference_sets(references.ReferenceSets(
      features.astype(np.float32), np.array([3, 3, 3, 1])))
  model.normalize.set_statistics(np.array([-10.0] * 4 + [0.0] * 4, np.float32),
                                 np.ones(DIM, np.float32))
  np.testing.assert_array_equal(training.confusable_classes(model, 1)[:, 0], [1, 0, 3, 2])
  assert training.confusable_classes(model, 3).shape == (NUM_CLASSES, 3)
  with pytest.raises(InputError, match="--negative_neighbors=4"):
    training.confusable_classes(model, NUM_CLASSES)


def test_trainer_draws_negatives_among_confusable_classes(feature_set, tmp_path):
  trainer = training.Trainer(MODEL_CONFIG, reference_sets(feature_set), feature_set,
                             str(tmp_path / "run"),
                             config(negative_neighbors=1, cross_class_negatives=1.0))
  nearest = training.confusable_classes(trainer.model, 1)[:, 0]
  original = {row.tobytes(): c for row, c in zip(trainer.train_rows["features"],
                                                 trainer.train_rows["class_id"])}
  verified, _ = next(iter(trainer.dataset))
  for row, class_id, label in zip(verified["features"].numpy(), verified["class_id"].numpy(),
                                  verified["verification"].numpy()):
    source = original[row.tobytes()]
    # Every verified query is a negative; the correct ones moved to their
    # class's nearest class, the mislabelled ones kept theirs.
    assert label == 0 and class_id in (source, nearest[source])


def test_pseudo_label_quantile_unset_is_the_verified_rows_noise_rate(feature_set, tmp_path):
  config_ = config(loss=dataclasses.replace(training.TrainConfig().loss,
                                            pseudo_label_quantile=None))
  trainer = training.Trainer(MODEL_CONFIG, reference_sets(feature_set), feature_set,
                             str(tmp_path / "run"), config_)
  rate = np.mean(trainer.train_rows["verification"] == 0)
  assert 0.05 < rate < 0.5
  assert trainer.loss_weights.pseudo_label_quantile == pytest.approx(rate)


def test_unverified_cross_class_negatives_repair_only_unverified_queries(tmp_path):
  info = make_feature_set(tmp_path / "fs", n=200, verified_share=0.2)
  rows = data.load_arrays(info, verification="verified")
  dataset = training.training_dataset(
      rows, info, config(unverified_cross_class_negatives=0.5, shuffle_buffer=200), 8, 32)
  verified, unverified = next(iter(dataset))
  labels = unverified["verification"].numpy()
  # About half the unverified queries become negatives of another class; the
  # verified queries keep their labels.
  assert set(labels) <= {-1, 0} and 0.2 < (labels == 0).mean() < 0.8, labels
  assert set(verified["verification"].numpy()) <= {0, 1}


def test_with_overrides_routes_model_training_and_loss_settings():
  model_config = {"num_classes": 3, "dropout": 0.0}
  new_model, new_train = training.with_overrides(
      model_config, training.TrainConfig(),
      {"dropout": 0.2, "weight_decay": 1e-3, "gamma": 1.0, "class_separation": 0.0})
  assert new_model["dropout"] == 0.2 and model_config["dropout"] == 0.0
  assert new_train.weight_decay == 1e-3 and new_train.loss.gamma == 1.0
  assert new_train.class_separation == 0.0
  with pytest.raises(InputError, match="unknown CleanNet setting 'gama'"):
    training.with_overrides(model_config, training.TrainConfig(), {"gama": 1.0})


class _FixedScorer:
  """What ``training.evaluate`` asks of a scorer, with given scores."""

  def __init__(self, scores, num_classes):
    self.scores = scores
    self.model = type("Model", (), {"num_classes": num_classes})()

  def refresh(self):
    pass

  def score(self, features, class_ids):
    del features, class_ids
    return self.scores


def test_evaluate_minimum_rule_widens_ties_only_when_some_classes_have_no_validation_rows():
  # Classes 0 and 1 validated; a flat error curve over the low scores (every
  # other row mislabeled) whose exact minimum sits at its top end.
  scores = np.tile(np.arange(50) / 50, 2)
  truth = np.ones(100, np.int64)
  truth[0:20:2] = truth[50:70:2] = 0
  truth[16:20] = truth[66:70] = 0
  val = {"features": np.zeros((100, 1)), "class_id": np.repeat([0, 1], 50),
         "verification": truth}
  exact = training.evaluate(_FixedScorer(scores, 2), val, "minimum")["delta"]
  assert exact == detection.select_threshold(val["class_id"], truth, scores)[0]
  # A third class without validation rows: the band of TrainConfig.threshold_tie_band.
  band = training.TrainConfig().threshold_tie_band
  result = training.evaluate(_FixedScorer(scores, 3), val, "minimum", band)
  transfer = result["delta"]
  assert transfer == detection.select_threshold(val["class_id"], truth, scores,
                                                tie_band=band)[0]
  assert transfer < exact
  # Model selection compares the lowest error, not the banded delta's.
  lowest = detection.select_threshold(val["class_id"], truth, scores)[1]
  assert result["min_avg_class_error"] == lowest < result["avg_class_error"]
  assert training.evaluate(_FixedScorer(scores, 3), val, "minimum", 0.0)["delta"] == exact


def test_evaluate_calibrated_rule_is_the_default_and_ignores_the_band():
  rng = np.random.default_rng(0)
  truth = (rng.random(400) < 0.8).astype(np.int64)
  scores = rng.normal(size=400) + truth
  val = {"features": np.zeros((400, 1)), "class_id": np.repeat([0, 1], 200),
         "verification": truth}
  assert training.TrainConfig().threshold_rule == "calibrated"
  result = training.evaluate(_FixedScorer(scores, 3), val)
  calibrated = detection.calibrated_threshold(val["class_id"], truth, scores)[0]
  assert result["delta"] == calibrated
  assert training.evaluate(_FixedScorer(scores, 3), val, "calibrated", 0.0)["delta"] == calibrated
  # Model selection still compares the lowest error over all thresholds.
  assert result["min_avg_class_error"] == detection.select_threshold(
      val["class_id"], truth, scores)[1]


def test_train_config_rejects_an_unknown_threshold_rule():
  with pytest.raises(InputError, match="--threshold_rule=median: must be one of calibrated"):
    training.TrainConfig(threshold_rule="median")


def test_nearest_classes_in_chunks_matches_the_full_cosine_matrix():
  embeddings = np.random.default_rng(0).normal(size=(7, 3))
  nearest, cosine = training.nearest_classes(embeddings, count=3, chunk_size=3)
  normed = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
  full = normed @ normed.T
  np.fill_diagonal(full, -np.inf)
  order = np.argsort(-full, axis=1)[:, :3]
  np.testing.assert_array_equal(nearest, order)
  np.testing.assert_allclose(cosine, np.take_along_axis(full, order, axis=1))


def test_class_separation_summary_names_coinciding_classes(caplog):
  embeddings = np.array([[1.0, 0.0], [0.99, 0.01], [0.0, 1.0]])
  with caplog.at_level("WARNING"):
    summary = training.class_separation_summary(embeddings, ["cat", "dog", "ship"])
  assert summary["closest_pair"] == ["cat", "dog"]
  assert summary["coinciding_classes"] == 2
  assert summary["closest_cosine"] > training.COINCIDING_COSINE
  assert "cat and dog" in caplog.text
  apart = training.class_separation_summary(np.eye(3), ["cat", "dog", "ship"])
  assert apart["coinciding_classes"] == 0 and apart["closest_cosine"] == 0.0


@pytest.mark.slow
def test_a_rerun_with_other_settings_is_a_one_line_error(feature_set, tmp_path):
  refs = reference_sets(feature_set)
  training.Trainer(MODEL_CONFIG, refs, feature_set, str(tmp_path), config(steps=3)).train()
  # A run written before two settings existed trained at their defaults.
  path = tmp_path / "settings.json"
  stored = json.loads(path.read_text())
  del stored["train"]["negative_neighbors"], stored["train"]["loss"]["pseudo_label_quantile"]
  path.write_text(json.dumps(stored))
  # Training longer resumes; training something else does not.
  training.Trainer(MODEL_CONFIG, refs, feature_set, str(tmp_path), config(steps=6)).train()
  other = training.Trainer(MODEL_CONFIG, refs, feature_set, str(tmp_path),
                           config(steps=6, class_separation=0.5))
  with pytest.raises(InputError, match=r"other settings \(class_separation 3.0 -> 0.5\)"):
    other.train()
  with pytest.raises(InputError, match=r"other settings \(negative_neighbors None -> 2\)"):
    training.Trainer(MODEL_CONFIG, refs, feature_set, str(tmp_path),
                     config(steps=9, negative_neighbors=2)).train()


def test_checkpoints_of_another_model_are_a_one_line_error(feature_set, tmp_path):
  refs = reference_sets(feature_set)
  training.Trainer(MODEL_CONFIG, refs, feature_set, str(tmp_path), config(steps=3)).train()
  os.remove(tmp_path / "settings.json")  # as written before settings.json existed
  smaller = {**MODEL_CONFIG, "query_hidden_dim": 4}
  with pytest.raises(InputError, match="cannot resume from these checkpoints") as error:
    training.Trainer(smaller, refs, feature_set, str(tmp_path), config(steps=6)).train()
  assert "\n" not in str(error.value)


def test_a_run_does_not_depend_on_the_global_seed_left_by_earlier_runs(feature_set, tmp_path):
  refs = reference_sets(feature_set)
  runs = []
  for earlier_seed in (5, 7):
    keras.utils.set_random_seed(earlier_seed)  # what an earlier run leaves behind
    trainer = training.Trainer(MODEL_CONFIG, refs, feature_set,
                               str(tmp_path / f"after{earlier_seed}"), config(seed=3))
    runs.append(([next(trainer.iterator) for _ in range(3)], weights_of(trainer.model)))
  (batches_a, weights_a), (batches_b, weights_b) = runs
  for batch_a, batch_b in zip(batches_a, batches_b):
    for part_a, part_b in zip(batch_a, batch_b):
      for name in part_a:
        np.testing.assert_array_equal(part_a[name], part_b[name])
  for a, b in zip(weights_a, weights_b):
    np.testing.assert_array_equal(a, b)


def test_seed_sets_the_initial_weights_and_split_seed_keeps_the_validation_rows(
    feature_set, tmp_path):
  refs = reference_sets(feature_set)

  def trainer(name, **overrides):
    return training.Trainer(MODEL_CONFIG, refs, feature_set, str(tmp_path / name),
                            config(**overrides))

  first, again = trainer("a", seed=0), trainer("b", seed=0)
  other_seed = trainer("c", seed=1, split_seed=0)
  other_split = trainer("d", seed=1)
  for a, b in zip(weights_of(first.model), weights_of(again.model)):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(weights_of(first.model)[0], weights_of(other_seed.model)[0])
  assert list(other_seed.val_rows["key"]) == list(first.val_rows["key"])
  assert list(other_split.val_rows["key"]) != list(first.val_rows["key"])
