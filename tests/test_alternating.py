"""The alternating scheme (Sec. 3.3) on tiny images: weights, rounds, resume."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from cleannet_tf import alternating, backbones, classifier, images, training
from image_fixture import write_images

_CLASSIFIER = classifier.ClassifierConfig(image_size=(16, 16), steps=3,
                                          global_batch_size=6, log_every=1)


def _config(rounds=2, weighting="soft"):
  return alternating.AlternatingConfig(
      rounds=rounds, weighting=weighting, step1=_CLASSIFIER,
      finetune=classifier.ClassifierConfig(image_size=(16, 16), steps=2,
                                           global_batch_size=6,
                                           learning_rate=0.01, log_every=1),
      cleannet_model=dict(query_hidden_dim=16, embedding_dim=8,
                          reference_hidden_dims=(16, 8), attention_dim=8),
      cleannet=training.TrainConfig(steps=4, global_batch_size=8, eval_every=2,
                                    checkpoint_every=2, log_every=2,
                                    shuffle_buffer=16, val_fraction=0.3),
      num_references=3, extract_batch_size=16)


@pytest.fixture(name="source")
def _source(tmp_path):
  return images.read_manifest(write_images(tmp_path))


def _one_step(source, weight, model_dir, strategy=None):
  """Trainable weights before and after one step on the first image alone."""
  single = images.ManifestSource(
      description="one image", class_names=source.class_names, num_rows=1,
      keys=source.keys[:1], paths=source.paths[:1], class_ids=source.class_ids[:1],
      verification=source.verification[:1])
  # Without weight decay: decoupled decay shrinks kernels whatever the loss.
  # Momentum starts at zero, so a zero gradient moves nothing in step one.
  config = classifier.ClassifierConfig(image_size=(16, 16), steps=1,
                                       global_batch_size=2, weight_decay=0.0,
                                       sample_weighting="loss")
  trainer = classifier.ClassifierTrainer(single, model_dir, config, strategy,
                                         sample_weights=np.array([weight]))
  before = [v.numpy().copy() for v in trainer.model.trainable_variables]
  trainer.train()
  after = [v.numpy() for v in trainer.model.trainable_variables]
  return before, after


@pytest.mark.parametrize("mirrored", [False, True])
def test_a_zero_loss_weight_leaves_the_classifier_unchanged(tmp_path, source, mirrored, request):
  # Batch-norm moving statistics follow the forward pass, not the loss, so
  # the claim is about the trainable weights.
  strategy = request.getfixturevalue("two_cpu_strategy") if mirrored else None
  before, after = _one_step(source, 0.0, str(tmp_path / "w0"), strategy)
  for a, b in zip(before, after):
    np.testing.assert_array_equal(a, b)
  before, after = _one_step(source, 1.0, str(tmp_path / "w1"), strategy)
  assert any(not np.array_equal(a, b) for a, b in zip(before, after))


def test_frozen_backbone_trains_the_head_only(tmp_path, source):
  step1 = classifier.ClassifierTrainer(source, str(tmp_path / "s1"), _CLASSIFIER)
  step1.train()
  config = classifier.ClassifierConfig(
      image_size=(16, 16), steps=2, global_batch_size=6, train_backbone=False,
      init_classifier=str(tmp_path / "s1" / classifier.CLASSIFIER_FILE))
  tuned = classifier.ClassifierTrainer(source, str(tmp_path / "s3"), config,
                                       sample_weights=np.ones(source.num_rows))
  for a, b in zip(step1.model.weights, tuned.model.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())  # started from step 1
  tuned.train()
  assert [v.path for v in tuned.model.trainable_variables] == [
      "logits/kernel", "logits/bias"]
  for a, b in zip(backbones.feature_extractor(step1.model).weights,
                  backbones.feature_extractor(tuned.model).weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  assert not np.array_equal(step1.model.get_layer("logits").kernel.numpy(),
                            tuned.model.get_layer("logits").kernel.numpy())


@pytest.mark.slow
def test_rounds_run_and_a_rerun_resumes_at_the_first_unfinished_step(tmp_path, source):
  out = str(tmp_path / "alt")
  first = alternating.AlternatingTrainer(source, source, out, _config())
  partial = first.run(stop_after_steps=3)
  assert first.ran == [(1, "step1"), (1, "step2-features"), (1, "step2-cleannet")]
  assert set(partial["rounds"][0]["steps"]) == {"step1", "step2-cleannet"}
  finished = {step: os.path.getmtime(os.path.join(
      alternating.step_directory(out, 1, step), alternating.FINAL_ARTEFACTS[step]))
              for step in ("step1", "step2-features", "step2-cleannet")}

  second = alternating.AlternatingTrainer(source, source, out, _config())
  summary = second.run()
  assert second.ran == [(1, "step3-weights"), (1, "step3-classifier"),
                        (2, "step2-features"), (2, "step2-cleannet"),
                        (2, "step3-weights"), (2, "step3-classifier")]
  for step, mtime in finished.items():
    assert os.path.getmtime(os.path.join(alternating.step_directory(out, 1, step),
                                         alternating.FINAL_ARTEFACTS[step])) == mtime
  with open(os.path.join(out, alternating.SUMMARY_FILE), encoding="utf-8") as f:
    assert json.load(f) == summary
  one, two = summary["rounds"]
  assert set(one["steps"]) == {"step1", "step2-cleannet", "step3-weights",
                               "step3-classifier"}
  assert set(two["steps"]) == {"step2-cleannet", "step3-weights", "step3-classifier"}
  weights = one["steps"]["step3-weights"]
  assert sum(weights["histogram"]) == source.num_rows
  assert 0.0 <= weights["mean_weight"] <= 1.0
  assert 0.0 <= two["steps"]["step2-cleannet"]["detection_error"] <= 1.0
  assert one["steps"]["step3-classifier"]["test_top1"] is not None

  saved = np.load(os.path.join(alternating.step_directory(out, 1, "step3-weights"),
                               alternating.WEIGHTS_FILE))
  np.testing.assert_array_equal(saved["w_hard"], saved["score"] >= saved["delta"])
  np.testing.assert_allclose(saved["w_soft"], np.maximum(saved["score"], 0))
  # Round 2 fine-tunes the head of round 1's classifier: same backbone.
  r1 = keras.models.load_model(os.path.join(
      alternating.step_directory(out, 1, "step3-classifier"), classifier.CLASSIFIER_FILE))
  r2 = keras.models.load_model(os.path.join(
      alternating.step_directory(out, 2, "step3-classifier"), classifier.CLASSIFIER_FILE))
  for a, b in zip(backbones.feature_extractor(r1).weights,
                  backbones.feature_extractor(r2).weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_binary_fails_with_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "tools.train_alternating", f"--out={tmp_path}",
       f"--manifest={tmp_path / 'missing.csv'}", f"--test_manifest={tmp_path / 'm.csv'}"],
      capture_output=True, text=True, check=False,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: {tmp_path / 'missing.csv'}: cannot read manifest (No such file or directory)")
