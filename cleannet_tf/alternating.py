"""The alternating training of CleanNet and the image classifier (Sec. 3.3).

Round 1:
1. ``step1``: the classifier trained on the noisy labels, all weights 1;
2. ``step2-features``: its convolutional layers f_cl become the feature
   extractor f_v: features of every training image;
   ``step2-cleannet``: K-means reference sets and CleanNet, trained to
   convergence (its best validation model);
3. ``step3-weights``: every training row scored once by CleanNet, giving
   w_soft and w_hard (Eq. 12-13) aligned with the source rows;
   ``step3-classifier``: the classifier fine-tuned with the chosen weights
   (Eq. 14).
Round r > 1 repeats steps 2-3 from round r-1's classifier (its CleanNet is
the paper's CleanNet*, Table 2), fine-tuning only the dense head.

Weights are precomputed once per round rather than scored inside the
classifier's step: CleanNet and the reference sets are fixed during step 3,
so the weights are too, and one pass over the features costs far less than
running CleanNet beside the CNN in every step (and needs no second model on
the accelerators).

Each step writes into ``<out>/round-<r>/<step>/``; its final artefact
(``FINAL_ARTEFACTS``) is written atomically and last, so a step is finished
exactly when it exists, and a rerun resumes at the first unfinished step
(each trainer also resumes from its own checkpoints within a step).
"""

import contextlib
import dataclasses
import io
import json
import os
from typing import Optional

from absl import logging
import keras
import numpy as np

from cleannet_tf import (classifier, data, detection, extraction, images, references,
                         scoring, training)
from cleannet_tf.errors import InputError

STEPS = ("step1", "step2-features", "step2-cleannet", "step3-weights",
         "step3-classifier")
WEIGHTS_FILE = "weights.npz"
SUMMARY_FILE = "summary.json"
FEATURES_SUBDIR = "all"
# The file whose presence means a step finished (relative to its directory).
FINAL_ARTEFACTS = {
    "step1": SUMMARY_FILE,
    "step2-features": os.path.join(FEATURES_SUBDIR, data.METADATA_FILE),
    "step2-cleannet": SUMMARY_FILE,
    "step3-weights": WEIGHTS_FILE,
    "step3-classifier": SUMMARY_FILE,
}
# w_soft / w_hard (Eq. 12-13), or rescaled to a mean of 1 in every class
# (``detection.balance_per_class``).
WEIGHTINGS = ("soft", "hard", "soft_balanced", "hard_balanced")
HISTOGRAM_BINS = 10


@dataclasses.dataclass(frozen=True)
class AlternatingConfig:
  """Settings of the whole scheme.

  Attributes:
    rounds: how many times steps 2-3 run (1 = the paper's steps 1-3).
    weighting: "soft" (w_soft, Eq. 12) or "hard" (w_hard, Eq. 13).
    step1: the step-1 classifier's training.
    finetune: step 3's training (its ``init_classifier`` and
      ``train_backbone`` are set per round).
    cleannet_model: ``CleanNet`` keyword arguments other than num_classes,
      feature_dim and num_references.
    cleannet: CleanNet's training.
    num_references: K, K-means references per class.
    extract_batch_size: images per feature-extraction batch.
  """
  rounds: int = 1
  weighting: str = "soft"
  step1: classifier.ClassifierConfig = classifier.ClassifierConfig()
  finetune: classifier.ClassifierConfig = classifier.ClassifierConfig(
      steps=1_000, learning_rate=0.01)
  cleannet_model: dict = dataclasses.field(default_factory=dict)
  cleannet: training.TrainConfig = training.TrainConfig()
  num_references: int = 50
  extract_batch_size: int = 256


def step_directory(out_dir: str, round_number: int, step: str) -> str:
  """``<out_dir>/round-<r>/<step>``."""
  return os.path.join(out_dir, f"round-{round_number}", step)


def is_finished(directory: str, step: str) -> bool:
  return os.path.exists(os.path.join(directory, FINAL_ARTEFACTS[step]))


@contextlib.contextmanager
def float32_policy():
  """Builds CleanNet in float32 even after a classifier set mixed_float16.

  The classifier trainer switches the global Keras policy on GPUs; CleanNet's
  cosine scores and thresholds are not meant for float16.
  """
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("float32")
  try:
    yield
  finally:
    keras.mixed_precision.set_global_policy(previous)


def extract(source: images.ImageSource, classifier_dir: str, out_dir: str,
            batch_size: int = 256) -> data.FeatureSetInfo:
  """Step 2a: features of every row by the classifier's backbone (f_cl -> f_v)."""
  extractor = extraction.load_feature_extractor(
      os.path.join(classifier_dir, classifier.FEATURE_EXTRACTOR_FILE))
  parts = extraction.extract_features(source, extractor, out_dir,
                                      batch_size=batch_size)
  return extraction.merge_feature_sets(parts, os.path.join(out_dir, FEATURES_SUBDIR))


def train_cleannet(info: data.FeatureSetInfo, model_dir: str,
                   config: AlternatingConfig, strategy=None,
                   references_path: Optional[str] = None) -> dict:
  """Step 2b: reference sets, then CleanNet to convergence; resumes.

  Args:
    references_path: reference sets to use; default: K-means sets built into
      ``model_dir/references.npz`` (kept for a rerun).

  Returns:
    The trainer's summary (``validation``: detection metrics of the best
    model on held-out verified rows).
  """
  os.makedirs(model_dir, exist_ok=True)
  if references_path is None:
    references_path = os.path.join(model_dir, "references.npz")
    if not os.path.exists(references_path):
      references.build_references_streamed(
          info, k=config.num_references, seed=config.cleannet.seed,
          work_dir=model_dir).save(references_path)
  sets = references.ReferenceSets.load(references_path)
  model_config = dict(config.cleannet_model, num_classes=info.num_classes,
                      num_references=sets.k, feature_dim=info.dim)
  with float32_policy():
    training.Trainer(model_config, sets, info, model_dir, config.cleannet,
                     strategy).train()
  return read_json(os.path.join(model_dir, SUMMARY_FILE))


def _row_keys(source: images.ImageSource) -> np.ndarray:
  """The source's keys, bytes [N], without decoding any image."""
  batches = source.records().map(lambda record: record["key"]).batch(65_536)
  return np.concatenate(list(batches.as_numpy_iterator())).astype(bytes)


def score_rows(model: keras.Model, info: data.FeatureSetInfo,
               source: images.ImageSource, batch_size: int = 4096) -> dict:
  """Step 3a: CleanNet's score and weights of every source row.

  Streams the feature set (memory holds one batch plus the [N] results) and
  places each row's results at its source row, matched by key. Rows without
  features (rejected at extraction) get weight 0; training skips them anyway.

  Returns:
    {"score" float32 [N], "w_soft", "w_hard", "w_soft_balanced",
    "w_hard_balanced" (float32 [N] each), "scored" bool [N], "delta" float32 [],
    "thresholds" float32 [L] (``scoring.class_thresholds``: delta, moved for
    the classes without verification labels; w_hard uses them)}.
  """
  keys = _row_keys(source)
  order = np.argsort(keys)
  sorted_keys = keys[order]
  scorer = scoring.Scorer(model)
  thresholds = scoring.class_thresholds(model).astype(np.float32)
  score = np.zeros(source.num_rows, np.float32)
  scored = np.zeros(source.num_rows, bool)
  class_ids = np.zeros(source.num_rows, np.int64)
  for batch in data.feature_dataset(info).batch(batch_size).as_numpy_iterator():
    batch_keys = batch["key"].astype(bytes)
    at = np.minimum(np.searchsorted(sorted_keys, batch_keys), len(keys) - 1)
    unknown = np.flatnonzero(sorted_keys[at] != batch_keys)
    if unknown.size:
      raise InputError(f"{info.directory}: key {batch_keys[unknown[0]]!r} is no "
                       f"row of {source.description}")
    rows = order[at]
    score[rows] = scorer.score(batch["features"], batch["class_id"], batch_size)
    scored[rows] = True
    class_ids[rows] = batch["class_id"]
  w_soft, w_hard = detection.sample_weights(score, thresholds[class_ids])
  weights = {"w_soft": np.where(scored, w_soft, 0), "w_hard": np.where(scored, w_hard, 0)}
  for name in ("w_soft", "w_hard"):
    weights[f"{name}_balanced"] = detection.balance_per_class(weights[name], class_ids)
  return {"score": score, **weights, "scored": scored,
          "delta": np.float32(model.delta.numpy()), "thresholds": thresholds}


def score_with_cleannet(cleannet_dir: str, info: data.FeatureSetInfo,
                        source: images.ImageSource) -> dict:
  """``score_rows`` with the best CleanNet that ``train_cleannet`` saved."""
  with float32_policy():
    model = keras.models.load_model(os.path.join(cleannet_dir, "model.keras"))
  return score_rows(model, info, source)


def save_weights(path: str, weights: dict) -> None:
  """Writes ``score_rows``' result as an .npz, atomically."""
  buffer = io.BytesIO()
  np.savez(buffer, **weights)
  temporary = path + ".tmp"
  with open(temporary, "wb") as out:
    out.write(buffer.getvalue())
  os.replace(temporary, path)


def load_weights(path: str, weighting: str, num_rows: int) -> np.ndarray:
  """The ``w_<weighting>`` array [num_rows] of a ``save_weights`` file."""
  if weighting not in WEIGHTINGS:
    raise InputError(f"--weighting: {weighting!r} is not one of {', '.join(WEIGHTINGS)}")
  if not os.path.isfile(path):
    raise InputError(f"--sample_weights: {path}: no such file")
  with np.load(path) as saved:
    weights = saved[f"w_{weighting}"]
  if weights.shape != (num_rows,):
    raise InputError(f"--sample_weights: {path}: {weights.shape[0]} weights, but the "
                     f"training images have {num_rows} rows")
  return weights


def weight_stats(weights: np.ndarray, scored: np.ndarray) -> dict:
  """Mean and 10-bin histogram over [0, 1] of the weights of scored rows."""
  kept = weights[scored]
  counts, _ = np.histogram(kept, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
  return {"mean_weight": float(kept.mean()) if kept.size else 0.0,
          "histogram": counts.tolist()}


def read_json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


class AlternatingTrainer:
  """Runs rounds of steps 1-3 into ``out_dir``; a rerun resumes.

  Attributes:
    ran: the (round, step) pairs this object ran (not those skipped as
      finished by an earlier run).
  """

  def __init__(self, source: images.ImageSource, test_source: images.ImageSource,
               out_dir: str, config: AlternatingConfig = AlternatingConfig(),
               strategy=None):
    if config.weighting not in WEIGHTINGS:
      raise InputError(f"--weighting: {config.weighting!r} is not one of "
                       f"{', '.join(WEIGHTINGS)}")
    if config.rounds < 1:
      raise InputError(f"--rounds={config.rounds}: must be at least 1")
    if tuple(test_source.class_names) != tuple(source.class_names):
      raise InputError(f"{test_source.description}: class names differ from "
                       f"{source.description}'s")
    self.source = source
    self.test_source = test_source
    self.out_dir = out_dir
    self.config = config
    self.strategy = strategy
    self.ran = []

  def _classifier_dir(self, round_number: int) -> str:
    """The classifier that round `round_number` extracts features with."""
    if round_number == 1:
      return step_directory(self.out_dir, 1, "step1")
    return step_directory(self.out_dir, round_number - 1, "step3-classifier")

  def _run_step(self, round_number: int, step: str, directory: str) -> None:
    config = self.config
    if step == "step1":
      classifier.ClassifierTrainer(self.source, directory, config.step1,
                                   self.strategy).train(self.test_source)
    elif step == "step2-features":
      extract(self.source, self._classifier_dir(round_number), directory,
              config.extract_batch_size)
    elif step == "step2-cleannet":
      train_cleannet(self._features(round_number), directory, config, self.strategy)
    elif step == "step3-weights":
      save_weights(os.path.join(directory, WEIGHTS_FILE), score_with_cleannet(
          step_directory(self.out_dir, round_number, "step2-cleannet"),
          self._features(round_number), self.source))
    else:
      weights = load_weights(
          os.path.join(step_directory(self.out_dir, round_number, "step3-weights"),
                       WEIGHTS_FILE), config.weighting, self.source.num_rows)
      finetune = dataclasses.replace(
          config.finetune,
          init_classifier=os.path.join(self._classifier_dir(round_number),
                                       classifier.CLASSIFIER_FILE),
          # Later rounds fine-tune the dense layers only (Sec. 3.3).
          train_backbone=round_number == 1)
      classifier.ClassifierTrainer(self.source, directory, finetune, self.strategy,
                                   weights).train(self.test_source)

  def _features(self, round_number: int) -> data.FeatureSetInfo:
    return data.read_info(os.path.join(
        step_directory(self.out_dir, round_number, "step2-features"), FEATURES_SUBDIR))

  def run(self, stop_after_steps: Optional[int] = None) -> dict:
    """Runs the unfinished steps in order; returns and writes the summary.

    Args:
      stop_after_steps: return after running this many steps (finished ones
        skipped do not count), leaving the rest to a rerun.

    Returns:
      ``summary()``, also written to ``<out_dir>/summary.json``.
    """
    os.makedirs(self.out_dir, exist_ok=True)
    for round_number in range(1, self.config.rounds + 1):
      for step in STEPS[1:] if round_number > 1 else STEPS:
        if stop_after_steps is not None and len(self.ran) >= stop_after_steps:
          return self.write_summary()
        directory = step_directory(self.out_dir, round_number, step)
        if is_finished(directory, step):
          logging.info("round %d %s: finished earlier, skipped", round_number, step)
          continue
        logging.info("round %d %s: running into %s", round_number, step, directory)
        os.makedirs(directory, exist_ok=True)
        self._run_step(round_number, step, directory)
        self.ran.append((round_number, step))
    return self.write_summary()

  def summary(self) -> dict:
    """Per round, the metrics of each finished step, read from its artefacts.

    ``step1`` and ``step3-classifier``: ``test_top1``; ``step2-cleannet``:
    ``detection_error`` (average per-class error of the best CleanNet on
    held-out verified rows, delta chosen on them), its cross-validated
    estimate and delta (from round 2 on, CleanNet* of Table 2: trained on
    features of the fine-tuned classifier); ``step3-weights``: mean and histogram of the weights
    used.
    """
    rounds = []
    for round_number in range(1, self.config.rounds + 1):
      steps = {}
      for step in STEPS:
        directory = step_directory(self.out_dir, round_number, step)
        if not is_finished(directory, step) or step == "step2-features":
          continue
        if step == "step3-weights":
          with np.load(os.path.join(directory, WEIGHTS_FILE)) as saved:
            steps[step] = {
                "weighting": self.config.weighting, "delta": float(saved["delta"]),
                **weight_stats(saved[f"w_{self.config.weighting}"], saved["scored"])}
          continue
        result = read_json(os.path.join(directory, SUMMARY_FILE))
        if step == "step2-cleannet":
          validation = result["validation"]
          steps[step] = {"model": "CleanNet" if round_number == 1 else "CleanNet*",
                         "detection_error": validation["avg_class_error"],
                         "cv_detection_error": validation.get("cv_avg_class_error"),
                         "delta": validation["delta"],
                         "best_step": result["best_step"]}
        else:
          steps[step] = {"test_top1": result.get("test_top1"),
                         "steps": result["steps"]}
      rounds.append({"round": round_number, "steps": steps})
    return {"weighting": self.config.weighting, "rounds": rounds}

  def write_summary(self) -> dict:
    summary = self.summary()
    data.atomic_write_text(os.path.join(self.out_dir, SUMMARY_FILE),
                           json.dumps(summary, indent=2) + "\n")
    return summary
