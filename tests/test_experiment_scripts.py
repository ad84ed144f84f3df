"""The scripts in docs/experiments/: regeneration.py's save, kept_noise.py, oracle_weighting.py."""

import importlib.util
import json
import os

import numpy as np
import pytest

_EXPERIMENTS = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "experiments")


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(_EXPERIMENTS, name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture
def regeneration(tmp_path, monkeypatch):
  module = _load("regeneration")
  monkeypatch.setattr(module, "ARCHIVE", str(tmp_path / "archive"))
  return module


def _write(path, text="x"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def _checkpoints(directory, steps):
  for step in steps:
    _write(os.path.join(directory, "checkpoints", f"ckpt-{step}.index"), str(step))
    _write(os.path.join(directory, "checkpoints", f"ckpt-{step}.data-00000-of-00001"))
  newest = f"ckpt-{steps[-1]}"
  _write(os.path.join(directory, "checkpoints", "checkpoint"),
         f'model_checkpoint_path: "{newest}"\n'
         + "".join(f'all_model_checkpoint_paths: "ckpt-{s}"\n' for s in steps))


def _listing(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, files in os.walk(root) for f in files)


def test_save_keeps_unfinished_variants_and_job_weights(regeneration, tmp_path):
  out = str(tmp_path / "runs")
  work = os.path.join(out, "features-x", "classification-scratch")
  _write(os.path.join(out, "job.json"), json.dumps({"name": "job"}))
  finetuned = os.path.join(out, "features-x", "classification")
  for variant in (os.path.join(work, "finetune-w_soft"), os.path.join(work, "finetune-clean"),
                  os.path.join(finetuned, "finetune-clean")):
    for name in ("summary.json", "classifier.keras", "feature_extractor.keras"):
      _write(os.path.join(variant, name))
  _checkpoints(os.path.join(work, "finetune-w_hard"), [500, 1000])
  os.makedirs(os.path.join(work, "finetune-none"))  # started, nothing written yet
  oracle = os.path.join(out, "features-x", "oracle-scratch", "correct-1")
  _checkpoints(oracle, [500])
  _write(os.path.join(work, "weights.npz"))
  _write(os.path.join(work, "cleannet", "summary.json"))
  _write(os.path.join(work, "cleannet", "best.keras"))

  regeneration.save(out)

  archive = regeneration.ARCHIVE
  kept = os.path.join("features-x", "classification-scratch")
  assert _listing(os.path.join(archive, kept)) == [
      "cleannet/summary.json",
      "finetune-clean/classifier.keras",  # --clean_from copies it
      "finetune-clean/feature_extractor.keras",
      "finetune-clean/summary.json",
      "finetune-w_hard/checkpoints/checkpoint",
      "finetune-w_hard/checkpoints/ckpt-1000.data-00000-of-00001",
      "finetune-w_hard/checkpoints/ckpt-1000.index",
      "finetune-w_soft/classifier.keras",
      "finetune-w_soft/feature_extractor.keras",
      "finetune-w_soft/summary.json",
      "weights.npz",
  ]
  with open(os.path.join(archive, kept, "finetune-w_hard", "checkpoints", "checkpoint"),
            encoding="utf-8") as f:
    assert f.read() == ('model_checkpoint_path: "ckpt-1000"\n'
                        'all_model_checkpoint_paths: "ckpt-1000"\n')
  assert os.path.exists(os.path.join(archive, "records", "job.json"))
  # oracle_weighting.py's classifier resumes on the next machine like a variant.
  assert _listing(os.path.join(archive, "features-x", "oracle-scratch")) == [
      "correct-1/checkpoints/checkpoint", "correct-1/checkpoints/ckpt-500.data-00000-of-00001",
      "correct-1/checkpoints/ckpt-500.index"]
  # The fine-tuned clean variant is read by no later job: its summary alone.
  assert _listing(os.path.join(archive, "features-x", "classification")) == [
      "finetune-clean/summary.json"]

  # Once the variant finishes, its summary replaces the kept checkpoint.
  _write(os.path.join(work, "finetune-w_hard", "summary.json"))
  regeneration.save(out)
  assert _listing(os.path.join(archive, kept, "finetune-w_hard")) == ["summary.json"]

  # A finished variant trained again: its checkpoint replaces the stale summary and models.
  os.remove(os.path.join(work, "finetune-w_soft", "summary.json"))
  _checkpoints(os.path.join(work, "finetune-w_soft"), [500])
  regeneration.save(out)
  assert _listing(os.path.join(archive, kept, "finetune-w_soft")) == [
      "checkpoints/checkpoint", "checkpoints/ckpt-500.data-00000-of-00001",
      "checkpoints/ckpt-500.index"]


def test_kept_noise_counts_drawn_wrong_labels():
  kept_noise = _load("kept_noise").kept_noise
  clean = np.array(["cat", "cat", "dog", "dog", "dog", "cat"])
  noisy = np.array(["cat", "dog", "cat", "cat", "dog", "dog"])
  majority = np.array(["cat", "dog", "dog", "cat", "dog", "cat"])
  draw = np.array([1.0, 0.5, 0.0, 1.0, 1.0, 0.5])
  drawn_noise, shared, per_pair = kept_noise(draw, noisy, clean, majority, num_pairs=2)
  # Wrong rows 1, 2, 3, 5 draw 0.5 + 0 + 1 + 0.5 of the 4 drawn in all.
  assert drawn_noise == pytest.approx(2.0 / 4.0)
  # The majority gave the wrong label too on rows 1 and 3: 1.5 of the 2 drawn.
  assert shared == pytest.approx(1.5 / 2.0)
  assert per_pair == {("cat", "dog"): pytest.approx(0.5), ("dog", "cat"): pytest.approx(0.5)}


def test_kept_noise_estimates_on_the_rows_cleannet_held_out():
  kept_noise = _load("kept_noise")
  noisy = np.array(["cat"] * 10 + ["dog"] * 10 + ["cat"] * 5)
  verification = np.array([1, 0] * 10 + [-1] * 5)
  validation = kept_noise.validation_rows(noisy, verification, 0.2, split_seed=0)
  # 2 of each class's 10 verified rows, never an unverified one, as CleanNet holds out.
  assert validation[:10].sum() == 2 and validation[10:20].sum() == 2
  assert not validation[20:].any()
  assert not np.array_equal(validation,
                            kept_noise.validation_rows(noisy, verification, 0.2, split_seed=1))
  # The rows verified 0 are the wrong labels; a perfect w_hard drops them all.
  clean = np.where(verification == 0, np.where(noisy == "cat", "dog", "cat"), noisy)
  weights = {"run": {"w_hard": (verification != 0).astype(np.float32),
                     "w_soft": np.full(len(noisy), 0.5, np.float32)}}
  text = kept_noise.report(weights, noisy, clean, clean, verification, validation,
                           ["w_hard", "w_soft"], num_pairs=1)
  assert "| run | w_hard | 0.0% | 100.0% | 0.0% / 100.0% | - |" in text
  # Equal weights draw everything: 10 of 25 rows wrong, and 2 of 4 held-out rows.
  assert "| run | w_soft | 40.0% | 100.0% | 50.0% / 100.0% | 0.0% |" in text


def test_oracle_weights_keep_a_share_of_the_correct_rows_only():
  oracle_weights = _load("oracle_weighting").oracle_weights
  truth = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 1])
  np.testing.assert_array_equal(oracle_weights(truth, 1.0, seed=0), truth)
  half = oracle_weights(truth, 0.5, seed=0)
  assert half.dtype == np.float32
  assert half[truth == 0].sum() == 0 and half.sum() == 4  # 4 of the 7 correct (rounded)
  np.testing.assert_array_equal(half, oracle_weights(truth, 0.5, seed=0))
  assert not np.array_equal(half, oracle_weights(truth, 0.5, seed=1))
