"""Steps 1 and 3 (Fig. 4): training the image classifier.

The paper fine-tunes its CNN on the noisy training set before extracting
features (Sec. 4.2). This is a plain supervised loop with standard
augmentation (zero-pad and random crop, random horizontal flip), SGD with
momentum and a cosine learning-rate decay, under a ``tf.distribute`` strategy.

Step 3 of the alternating scheme (Sec. 3.3) is the same loop with per-image
sample weights w (Eq. 14: w * cross-entropy), started from a trained
classifier (``init_classifier``) and, in later rounds, with the backbone
frozen (``train_backbone=False``). Weights are given per source row. By
default (``sample_weighting="sampling"``) the input pipeline draws each row
with probability w / max(w); with "loss" every row is drawn and w rides
through the pipeline next to the label into the loss.

Resume is exact without checkpointing a tf.data iterator (whose shuffle
buffer of a million file names would be saved with every checkpoint): the
stream of rows is a seeded shuffle repeated over epochs, the same in every
run, and element p's augmentation is drawn from a stateless RNG seeded by p.
The stream is therefore a pure function of the position, and a resumed run
starts it at ``step * global_batch_size``. (Rows whose image
cannot be decoded are dropped, which shifts later batches by the number
dropped; with such rows a resumed run sees slightly different batches.)
"""

import dataclasses
import json
import os
import shutil
import time
from typing import Optional

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from cleannet_tf import backbones, distribute, images
from cleannet_tf.errors import InputError

CLASSIFIER_FILE = "classifier.keras"
FEATURE_EXTRACTOR_FILE = "feature_extractor.keras"


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  """Step-1 hyperparameters (the paper gives none; CIFAR-style defaults)."""
  backbone: str = "small_resnet"
  backbone_weights: Optional[str] = None
  image_size: tuple[int, int] = (32, 32)
  steps: int = 5_000
  global_batch_size: int = 128
  learning_rate: float = 0.1
  momentum: float = 0.9
  weight_decay: float = 5e-4
  pad_fraction: float = 0.125
  shuffle_buffer: int = 100_000
  checkpoint_every: int = 500
  log_every: int = 100
  keep_checkpoints: int = 3
  seed: int = 0
  # Fine-tuning: a ``classifier.keras`` to start from (a checkpoint in the
  # model directory, i.e. a resumed run, takes precedence), and whether the
  # backbone f_cl is trained or frozen (only the dense head learns).
  init_classifier: Optional[str] = None
  train_backbone: bool = True
  # How sample weights w enter training (SAMPLE_WEIGHTINGS): "loss" multiplies
  # each image's cross-entropy by w (Eq. 14 literally; batches drawn
  # uniformly); "sampling" draws each row with probability w / max(w) and
  # weighs every drawn image 1. Both minimise the same objective in
  # expectation, but sampling fills every batch with images that count, so a
  # fixed step budget is not spent on rows weighted ~0; for w_hard it is the
  # explicit removal of flagged rows that Sec. 3.3 equates it with. With
  # little label noise, "loss" did better (BENCHMARKS.md, aggre_label): there
  # drawing mostly thins out correct images.
  sample_weighting: str = "sampling"


SAMPLE_WEIGHTINGS = ("sampling", "loss")


def use_mixed_precision_on_gpus() -> bool:
  """Sets the global Keras policy to mixed_float16 when GPUs are visible.

  Must run before models are built; it changes the policy for the process.
  """
  if not tf.config.list_physical_devices("GPU"):
    return False
  keras.mixed_precision.set_global_policy("mixed_float16")
  return True


def augment(image: tf.Tensor, seed: tf.Tensor, pad: int) -> tf.Tensor:
  """Zero-pad by `pad`, random crop back, random flip; image float [H, W, 3].

  Args:
    seed: int64 [2], the stateless RNG seed of this element.
  """
  height, width = image.shape[0], image.shape[1]
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  image = tf.image.stateless_random_crop(padded, [height, width, 3], seed=seed)
  # A different seed: the flip must not be correlated with the crop offset.
  return tf.image.stateless_random_flip_left_right(image, seed=seed + [0, 1])


def training_dataset(source: images.ImageSource, config: ClassifierConfig,
                     start: int, input_context=None,
                     sample_weights: Optional[np.ndarray] = None
                     ) -> tf.data.Dataset:
  """Augmented training batches from stream position `start` on.

  Args:
    start: position of the first element (global over all input pipelines).
    input_context: from ``distribute_datasets_from_function``; this pipeline
      decodes only its share of the elements.
    sample_weights: float32 [N], the weight of each source row; None for all
      1. With ``config.sample_weighting == "sampling"`` a row is drawn with
      probability w / max(w) (every drawn image weighs 1), otherwise w is
      the element's loss weight.

  Returns:
    Dataset of (images float [b, H, W, 3], class ids int64 [b], weights
    float32 [b]) with b the per-replica batch size, repeating forever.
  """
  buffer = max(1, min(source.num_rows, config.shuffle_buffer))
  # A seeded shuffle draws a new order each epoch, the same orders every run.
  # skip() replays the stream up to `start` on undecoded records only.
  stream = (source.records()
            .shuffle(buffer, seed=config.seed, reshuffle_each_iteration=True)
            .repeat())
  loss_weights = None
  if sample_weights is not None and config.sample_weighting == "sampling":
    stream = draw_by_weight(stream, sample_weights, config.seed)
  elif sample_weights is not None:
    # Looked up by row index, so the weights follow the rows through shuffling.
    loss_weights = tf.constant(sample_weights, tf.float32)
  stream = stream.enumerate().skip(start)
  batch = config.global_batch_size
  if input_context is not None:
    stream = stream.shard(input_context.num_input_pipelines,
                          input_context.input_pipeline_id)
    batch = input_context.get_per_replica_batch_size(batch)
  pad = int(round(config.pad_fraction * min(config.image_size)))

  def load(position, record):
    image = images.decode(source.encoded_bytes(record), config.image_size)
    seed = tf.stack([tf.constant(config.seed, tf.int64), position])
    weight = (tf.constant(1.0) if loss_weights is None
              else tf.gather(loss_weights, record["index"]))
    return augment(image, seed, pad), record["class_id"], weight

  return (stream.map(load, num_parallel_calls=tf.data.AUTOTUNE)
          .ignore_errors()  # extraction lists the unreadable rows
          .batch(batch, drop_remainder=True)
          .prefetch(tf.data.AUTOTUNE))


def draw_by_weight(records: tf.data.Dataset, sample_weights: np.ndarray,
                    seed: int) -> tf.data.Dataset:
  """Keeps each record of the endless stream with probability w[index] / max(w).

  The draw of the record at stream position p uses the stateless seed
  (seed, -1 - p), which no augmentation uses (those are (seed, q >= 0)), so
  the kept stream is a pure function of the position too and a resumed run
  replays it exactly.
  """
  acceptance = tf.constant(sample_weights / sample_weights.max(), tf.float32)

  def kept(position, record):
    draw = tf.random.stateless_uniform(
        [], seed=tf.stack([tf.constant(seed, tf.int64), -1 - position]))
    return draw < tf.gather(acceptance, record["index"])

  return records.enumerate().filter(kept).map(lambda _, record: record)


def evaluate_top1(model: keras.Model, source: images.ImageSource,
                  image_size, batch_size: int = 256) -> tuple[float, int]:
  """(top-1 accuracy, images scored) of a classifier on a labelled source."""
  predict = tf.function(lambda x: tf.argmax(model(x, training=False), axis=-1),
                        reduce_retracing=True)
  correct = total = 0
  for batch in images.image_dataset(source, image_size, batch_size):
    predicted = predict(batch["image"])
    correct += int(tf.reduce_sum(tf.cast(predicted == batch["class_id"], tf.int64)))
    total += int(tf.shape(predicted)[0])
  return correct / max(total, 1), total


def _save_atomically(model: keras.Model, path: str) -> None:
  temporary = path[:-len(".keras")] + ".tmp.keras"
  model.save(temporary)
  os.replace(temporary, path)


def _check_sample_weights(weights, num_rows: int) -> np.ndarray:
  """float32 [num_rows] finite, >= 0; raises InputError otherwise."""
  weights = np.asarray(weights, np.float32)
  if weights.shape != (num_rows,):
    raise InputError(f"sample weights: shape {weights.shape}, expected "
                     f"({num_rows},), one per training row")
  if not np.all(np.isfinite(weights)) or np.any(weights < 0):
    raise InputError("sample weights: must be finite and >= 0")
  return weights


def _load_initial_weights(model: keras.Model, path: str) -> None:
  """Copies a saved classifier's weights (same backbone and classes) into `model`."""
  if not os.path.isfile(path):
    raise InputError(f"--init_classifier: {path}: no such file")
  try:
    model.set_weights(keras.models.load_model(path, compile=False).get_weights())
  except ValueError as e:
    raise InputError(f"--init_classifier: {path}: not a classifier of this "
                     f"backbone and number of classes ({str(e).splitlines()[0]})"
                     ) from e


def reuse_finished(source_dir: str, model_dir: str,
                   test_source: Optional[images.ImageSource] = None) -> dict:
  """Copies another run's finished classifier into ``model_dir``; its summary.

  For features from a network trained elsewhere (e.g. on other labels of the
  same images): the copy is what ``ClassifierTrainer`` leaves, so every later
  step reads ``model_dir`` as usual. The top-1 is measured again on
  `test_source` (this run's test images), and the summary records
  ``reused_from``. A rerun with the same source keeps the copy; a
  ``model_dir`` trained here or copied from elsewhere is refused.
  """
  source_dir = os.path.abspath(source_dir)
  summary_path = os.path.join(model_dir, "summary.json")
  if os.path.exists(summary_path):
    with open(summary_path, encoding="utf-8") as f:
      summary = json.load(f)
    if summary.get("reused_from") != source_dir:
      raise InputError(f"{model_dir}: holds a classifier "
                       + (f"copied from {summary['reused_from']}" if "reused_from" in summary
                          else "trained there") + f", not {source_dir}'s; use another output")
    return summary
  needed = [CLASSIFIER_FILE, FEATURE_EXTRACTOR_FILE, "summary.json"]
  missing = [name for name in needed if not os.path.isfile(os.path.join(source_dir, name))]
  if missing:
    raise InputError(f"{source_dir}: no {missing[0]}; not a finished classifier folder")
  with open(os.path.join(source_dir, "summary.json"), encoding="utf-8") as f:
    summary = {**json.load(f), "reused_from": source_dir}
  model = keras.models.load_model(os.path.join(source_dir, CLASSIFIER_FILE), compile=False)
  if test_source is not None:
    if int(model.output_shape[-1]) != len(test_source.class_names):
      raise InputError(f"{source_dir}: its classifier has {model.output_shape[-1]} classes, "
                       f"{test_source.description} {len(test_source.class_names)}")
    image_size = tuple(summary.get("config", {}).get("image_size", (32, 32)))
    accuracy, count = evaluate_top1(model, test_source, image_size)
    logging.info("test top-1 %.4f on %d images of %s (classifier of %s)", accuracy, count,
                 test_source.description, source_dir)
    summary.update(test_top1=accuracy, test_images=count)
  os.makedirs(model_dir, exist_ok=True)
  for name in needed[:2]:
    temporary = os.path.join(model_dir, name + ".tmp")
    shutil.copyfile(os.path.join(source_dir, name), temporary)
    os.replace(temporary, os.path.join(model_dir, name))
  temporary = summary_path + ".tmp"
  with open(temporary, "w", encoding="utf-8") as out:
    json.dump(summary, out, indent=2)
  os.replace(temporary, summary_path)
  return summary


class ClassifierTrainer:
  """Trains a classifier into ``model_dir``; a rerun resumes.

  ``model_dir`` receives ``checkpoints/`` (model and optimizer), and at the
  end ``classifier.keras``, ``feature_extractor.keras`` (the backbone, f_v)
  and, last, ``summary.json``.
  """

  def __init__(self, source: images.ImageSource, model_dir: str,
               config: ClassifierConfig = ClassifierConfig(), strategy=None,
               sample_weights: Optional[np.ndarray] = None):
    """Builds the model and optimizer (in the strategy's scope).

    Args:
      sample_weights: float32 [N], Eq. 14's weight of each row of `source`
        (w_soft or w_hard); None trains with all weights 1 (step 1).
    """
    self.source = source
    self.model_dir = model_dir
    self.config = config
    self.strategy = strategy or tf.distribute.get_strategy()
    if config.sample_weighting not in SAMPLE_WEIGHTINGS:
      raise InputError(f"--sample_weighting={config.sample_weighting!r}: not one of "
                       f"{', '.join(SAMPLE_WEIGHTINGS)}")
    if config.global_batch_size % self.strategy.num_replicas_in_sync:
      raise InputError(f"--batch_size={config.global_batch_size} is not divisible "
                       f"by the {self.strategy.num_replicas_in_sync} replicas")
    self.sample_weights = (None if sample_weights is None else
                           _check_sample_weights(sample_weights, source.num_rows))
    if (self.sample_weights is not None and config.sample_weighting == "sampling"
        and not self.sample_weights.any()):
      raise InputError("sample weights: all 0, no row can be drawn")
    self.mixed_precision = use_mixed_precision_on_gpus()
    keras.utils.set_random_seed(config.seed)
    with self.strategy.scope():
      backbone = backbones.build_backbone(
          config.backbone, (*config.image_size, 3), config.backbone_weights)
      self.model = backbones.build_classifier(backbone, len(source.class_names))
      if config.init_classifier:
        _load_initial_weights(self.model, config.init_classifier)
      # Frozen, the backbone also keeps its batch-norm statistics (Keras runs
      # non-trainable BatchNormalization in inference mode).
      backbones.feature_extractor(self.model).trainable = config.train_backbone
      schedule = keras.optimizers.schedules.CosineDecay(config.learning_rate,
                                                        config.steps)
      sgd = keras.optimizers.SGD(schedule, momentum=config.momentum,
                                 weight_decay=config.weight_decay)
      # Decay convolution and dense kernels only, not biases or BN scales.
      sgd.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
      self.optimizer = (keras.optimizers.LossScaleOptimizer(sgd)
                        if self.mixed_precision else sgd)
      # Built in the scope: building lazily inside the first distributed
      # step fails in replica context.
      self.optimizer.build(self.model.trainable_variables)
    self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer)
    self.manager = tf.train.CheckpointManager(
        self.checkpoint, distribute.worker_directory(
            os.path.join(model_dir, "checkpoints"), self.strategy),
        max_to_keep=config.keep_checkpoints)
    self._train_step = tf.function(self._distributed_step)

  @property
  def step(self) -> int:
    return int(self.optimizer.iterations.numpy())

  def _replica_step(self, pixels, labels, weights):
    with tf.GradientTape() as tape:
      logits = self.model(pixels, training=True)
      # Eq. 14, averaged over the global batch rather than over the sum of
      # its weights: a batch of mostly mislabelled (low-weight) images then
      # moves the classifier less, instead of being renormalised up.
      per_image = weights * keras.losses.sparse_categorical_crossentropy(
          labels, logits, from_logits=True)
      loss = tf.nn.compute_average_loss(
          per_image, global_batch_size=self.config.global_batch_size)
      # Identity for plain SGD; multiplied by the loss scale under mixed precision.
      scaled = self.optimizer.scale_loss(loss)
    gradients = tape.gradient(scaled, self.model.trainable_variables)
    self.optimizer.apply_gradients(zip(gradients, self.model.trainable_variables))
    correct = tf.reduce_sum(tf.cast(tf.argmax(logits, -1) == labels, tf.float32))
    return {"loss": loss,
            "accuracy": correct / self.config.global_batch_size}

  def _distributed_step(self, pixels, labels, weights):
    per_replica = self.strategy.run(self._replica_step,
                                    args=(pixels, labels, weights))
    return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

  def train(self, test_source: Optional[images.ImageSource] = None) -> dict:
    """Trains to ``config.steps``, resuming; saves the models; returns a summary.

    ``summary.json`` is written last (atomically): its presence means the
    run finished.

    Args:
      test_source: labelled images for the final top-1 accuracy.
    """
    config = self.config
    restored = self.manager.restore_or_initialize()
    if restored:
      logging.info("Resumed from %s at step %d", restored, self.step)
    start = self.step * config.global_batch_size
    batches = iter(self.strategy.distribute_datasets_from_function(
        lambda context: training_dataset(self.source, config, start, context,
                                         self.sample_weights)))
    started, start_step = time.time(), self.step
    while self.step < config.steps:
      metrics = self._train_step(*next(batches))
      step = self.step
      if not np.isfinite(metrics["loss"].numpy()):
        raise InputError(f"step-1 training diverged at step {step}: the loss is "
                         "not finite; lower --learning_rate")
      if step % config.log_every == 0 or step == config.steps:
        rate = ((step - start_step) * config.global_batch_size
                / max(time.time() - started, 1e-9))
        logging.info("step %d/%d loss %.4f batch accuracy %.3f %.1f images/s",
                     step, config.steps, metrics["loss"], metrics["accuracy"], rate)
      if step % config.checkpoint_every == 0 or step == config.steps:
        self.manager.save(checkpoint_number=step)
    summary = {"steps": self.step, "num_classes": len(self.source.class_names),
               "train_rows": self.source.num_rows,
               "config": dataclasses.asdict(config)}
    if self.sample_weights is not None:
      summary["mean_sample_weight"] = float(self.sample_weights.mean())
      if config.sample_weighting == "sampling":
        summary["sampled_row_fraction"] = float(self.sample_weights.mean()
                                                / self.sample_weights.max())
    if test_source is not None:
      if tuple(test_source.class_names) != tuple(self.source.class_names):
        raise InputError(f"{test_source.description}: class names differ from "
                         f"{self.source.description}'s")
      accuracy, count = evaluate_top1(self.model, test_source, config.image_size)
      logging.info("test top-1 %.4f on %d images of %s", accuracy, count,
                   test_source.description)
      summary.update(test_top1=accuracy, test_images=count)
    if distribute.is_chief(self.strategy):
      _save_atomically(self.model, os.path.join(self.model_dir, CLASSIFIER_FILE))
      _save_atomically(backbones.feature_extractor(self.model),
                       os.path.join(self.model_dir, FEATURE_EXTRACTOR_FILE))
      temporary = os.path.join(self.model_dir, "summary.json.tmp")
      with open(temporary, "w", encoding="utf-8") as out:
        json.dump(summary, out, indent=2)
      os.replace(temporary, os.path.join(self.model_dir, "summary.json"))
    return summary
