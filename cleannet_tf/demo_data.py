"""Embedded default data for the demo: scikit-learn's digits as a CleanNet task.

The 1797 8x8 digit images that ship with scikit-learn are turned into the
setting of the paper (Lee et al., CVPR 2018, Sec. 3-4):

1. Class-dependent label noise: a fixed fraction of each true class is flipped
   to one or two visually confusable classes (``CONFUSION_MAP``), so noise is
   structured like real web-label noise rather than uniform.
2. Verification labels (1 = noisy label is right, 0 = wrong, -1 = unknown) on a
   small fraction of the images in a seeded subset of the classes; a class is
   that of the NOISY label, because a verification is about an
   (image, noisy label) pair.
3. Features from the penultimate layer of a small Keras classifier trained on
   the noisy labels only (the paper's step 1).

Clean labels are used only to derive the verification labels and as the
returned evaluation truth; nothing is ever trained on them.
"""

import dataclasses
import os

import keras
import numpy as np
from sklearn import datasets

from cleannet_tf import data

NUM_CLASSES = 10

# Where each true digit's wrong labels go: pairs that share strokes in 8x8
# handwriting. Every class flips to one or two fixed targets, chosen uniformly.
CONFUSION_MAP: dict[int, tuple[int, ...]] = {
    0: (6,),
    1: (7,),
    2: (7, 3),
    3: (8, 5),
    4: (9,),
    5: (6, 9),
    6: (0, 5),
    7: (1, 2),
    8: (3, 1),
    9: (4, 5),
}

# Name of the penultimate layer whose output is the feature vector.
FEATURE_LAYER = "features"
FEATURE_DIM = 64


@dataclasses.dataclass(frozen=True)
class DemoData:
  """A noisy-label problem with features, ready for reference sets and CleanNet.

  Attributes:
    keys: object [N] of str, unique image ids such as ``"digits-00017"`` (the
      index into ``sklearn.datasets.load_digits``).
    images: float32 [N, 8, 8, 1], pixel intensities scaled to [0, 1].
    clean_labels: int64 [N], ground truth; for evaluation only.
    noisy_labels: int64 [N], the labels the classifier was trained on.
    verification: int64 [N] in {-1, 0, 1}: 1 where a human-style check says the
      noisy label is right, 0 wrong, -1 not verified.
    features: float32 [N, D], non-negative (ReLU) penultimate-layer outputs of
      the step-1 classifier, D = ``FEATURE_DIM``.
    verified_classes: int64 [V], sorted noisy-label classes that carry
      verification labels.
    class_names: ``("0", ..., "9")``, indexed by label.
    classifier_noisy_accuracy: step-1 classifier accuracy against the noisy
      labels on its own training images.
    noise_rate: fraction of images whose noisy label differs from the clean one.
  """
  keys: np.ndarray
  images: np.ndarray
  clean_labels: np.ndarray
  noisy_labels: np.ndarray
  verification: np.ndarray
  features: np.ndarray
  verified_classes: np.ndarray
  class_names: tuple[str, ...]
  classifier_noisy_accuracy: float
  noise_rate: float

  def feature_set(self, directory) -> data.FeatureSetInfo:
    """The demo's images as a feature set in `directory`, written there unless it is."""
    if not os.path.exists(os.path.join(directory, "metadata.json")):
      data.write_features(directory, self.keys, self.features, self.noisy_labels,
                          self.verification, self.class_names, source="digits demo")
    return data.read_info(directory)


def make_label_noise(clean_labels: np.ndarray, noise_rate: float = 0.3,
                     seed: int = 0) -> np.ndarray:
  """Flips labels to confusable classes following ``CONFUSION_MAP``.

  In every true class c, ``round(noise_rate * count(c))`` images chosen at
  random get a label drawn uniformly from ``CONFUSION_MAP[c]``; a fixed count
  per class (rather than a coin per image) keeps the noise rate of every class,
  and so of the whole set, at ``noise_rate`` up to rounding.

  Args:
    clean_labels: int [N], values in [0, 10).
    noise_rate: fraction of each class to flip, in [0, 1].
    seed: seed of the private random generator.

  Returns:
    int64 [N], the noisy labels.

  Raises:
    ValueError: on labels outside [0, 10) or a rate outside [0, 1].
  """
  clean_labels = np.asarray(clean_labels, dtype=np.int64)
  if not 0.0 <= noise_rate <= 1.0:
    raise ValueError(f"noise_rate {noise_rate} is not in [0, 1]")
  if clean_labels.size and (clean_labels.min() < 0 or
                            clean_labels.max() >= NUM_CLASSES):
    raise ValueError(f"labels must be in [0, {NUM_CLASSES})")
  rng = np.random.default_rng(seed)
  noisy = clean_labels.copy()
  for c, targets in CONFUSION_MAP.items():
    rows = np.flatnonzero(clean_labels == c)
    flip = rng.permutation(rows)[:int(round(noise_rate * rows.size))]
    noisy[flip] = rng.choice(np.array(targets, dtype=np.int64), size=flip.size)
  return noisy


def make_verification_labels(clean_labels: np.ndarray, noisy_labels: np.ndarray,
                             verified_classes: np.ndarray,
                             fraction: float = 0.1,
                             seed: int = 0) -> np.ndarray:
  """Verifies a random fraction of the images of each verified class.

  For every class c in ``verified_classes``, ``max(1, round(fraction * n_c))``
  of the n_c images whose NOISY label is c are picked at random and labelled
  1 if the noisy label equals the clean one, else 0 (what a human checking
  "is this image a c?" would answer).

  Args:
    clean_labels: int [N], ground truth.
    noisy_labels: int [N].
    verified_classes: int [V], noisy-label classes to verify.
    fraction: fraction of each verified class to label, in (0, 1].
    seed: seed of the private random generator.

  Returns:
    int64 [N] in {-1, 0, 1}; -1 outside the picked rows.

  Raises:
    ValueError: on mismatched shapes or a fraction outside (0, 1].
  """
  clean_labels = np.asarray(clean_labels, dtype=np.int64)
  noisy_labels = np.asarray(noisy_labels, dtype=np.int64)
  if clean_labels.shape != noisy_labels.shape:
    raise ValueError(f"clean labels {clean_labels.shape} and noisy labels "
                     f"{noisy_labels.shape} differ in shape")
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction {fraction} is not in (0, 1]")
  rng = np.random.default_rng(seed)
  verification = np.full(clean_labels.shape, -1, dtype=np.int64)
  for c in np.asarray(verified_classes, dtype=np.int64):
    rows = np.flatnonzero(noisy_labels == c)
    if not rows.size:
      continue
    picked = rng.permutation(rows)[:max(1, int(round(fraction * rows.size)))]
    verification[picked] = (noisy_labels[picked] ==
                            clean_labels[picked]).astype(np.int64)
  return verification


def _train_classifier(images: np.ndarray, noisy_labels: np.ndarray,
                      num_classes: int, epochs: int,
                      seed: int) -> keras.Model:
  """Trains the step-1 classifier (small conv net) on the noisy labels.

  Args:
    images: float32 [N, 8, 8, 1] in [0, 1].
    noisy_labels: int [N] in [0, num_classes).
    num_classes: number of output classes.
    epochs: passes over the data; kept small so that the net learns the
      majority (clean) pattern of each class before it memorises the flips,
      otherwise noisy images would get features like those of their noisy class.
    seed: seeds Keras, TensorFlow, NumPy and Python (global state).

  Returns:
    The classifier, logits [N, num_classes]; its layer ``FEATURE_LAYER`` is the
    penultimate Dense(64, relu).
  """
  keras.utils.set_random_seed(seed)
  inputs = keras.Input(shape=images.shape[1:], name="image")
  x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
  x = keras.layers.MaxPooling2D(2)(x)
  x = keras.layers.Flatten()(x)
  x = keras.layers.Dense(FEATURE_DIM, activation="relu", name=FEATURE_LAYER)(x)
  logits = keras.layers.Dense(num_classes, name="logits")(x)
  model = keras.Model(inputs, logits, name="digits_classifier")
  model.compile(
      optimizer=keras.optimizers.Adam(1e-3),
      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      metrics=["accuracy"])
  model.fit(images, np.asarray(noisy_labels, dtype=np.int64), batch_size=32,
            epochs=epochs, shuffle=True, verbose=0)
  return model


def _feature_model(classifier: keras.Model) -> keras.Model:
  """The sub-model from the classifier's input to ``FEATURE_LAYER``."""
  return keras.Model(classifier.inputs,
                     classifier.get_layer(FEATURE_LAYER).output,
                     name="digits_features")


def _feature_model_with_logits(classifier: keras.Model) -> keras.Model:
  """Maps images to (logits [B, 10], features [B, 64]) in one pass."""
  return keras.Model(classifier.inputs,
                     [classifier.output,
                      classifier.get_layer(FEATURE_LAYER).output])


def train_feature_extractor(images: np.ndarray, noisy_labels: np.ndarray,
                            num_classes: int, epochs: int = 8,
                            seed: int = 0) -> keras.Model:
  """Trains the step-1 classifier on noisy labels; returns its feature model.

  Args:
    images: float32 [N, H, W, 1] in [0, 1].
    noisy_labels: int [N] in [0, num_classes).
    num_classes: number of classes.
    epochs: training passes (few, see ``_train_classifier``).
    seed: global Keras seed.

  Returns:
    A model mapping images [B, H, W, 1] to float32 features [B, 64] >= 0.
  """
  return _feature_model(
      _train_classifier(images, noisy_labels, num_classes, epochs, seed))


def make_digits_demo(seed: int = 0, noise_rate: float = 0.3,
                     verified_fraction: float = 0.1,
                     num_verified_classes: int = 5,
                     epochs: int = 8) -> DemoData:
  """Builds the default demo problem from scikit-learn's digits.

  All 1797 images form the noisy training set of the step-1 classifier, whose
  features are then extracted for every image.

  Args:
    seed: seeds the noise, the choice of verified classes and rows, and Keras.
    noise_rate: per-class flip fraction for ``make_label_noise``.
    verified_fraction: fraction of each verified class with verification labels.
    num_verified_classes: how many of the 10 classes get verification labels.
    epochs: training passes of the step-1 classifier.

  Returns:
    The ``DemoData``.

  Raises:
    ValueError: on arguments out of range.
  """
  if not 0 <= num_verified_classes <= NUM_CLASSES:
    raise ValueError(f"num_verified_classes {num_verified_classes} is not in "
                     f"[0, {NUM_CLASSES}]")
  digits = datasets.load_digits()
  # Raw pixels are integers 0..16.
  images = (digits.images / 16.0).astype(np.float32)[..., np.newaxis]
  clean = digits.target.astype(np.int64)
  keys = np.array([f"digits-{i:05d}" for i in range(clean.size)], dtype=object)

  # Independent streams per step so that changing one step's argument (say,
  # the noise rate) leaves the other steps' draws (say, which classes are
  # verified) unchanged.
  noise_seed, class_seed, verify_seed = (
      np.random.SeedSequence(seed).generate_state(3))
  noisy = make_label_noise(clean, noise_rate, seed=int(noise_seed))
  verified_classes = np.sort(
      np.random.default_rng(int(class_seed)).choice(
          NUM_CLASSES, size=num_verified_classes, replace=False)).astype(
              np.int64)
  verification = make_verification_labels(clean, noisy, verified_classes,
                                          verified_fraction,
                                          seed=int(verify_seed))

  classifier = _train_classifier(images, noisy, NUM_CLASSES, epochs, seed)
  logits, features = _feature_model_with_logits(classifier).predict(
      images, batch_size=256, verbose=0)
  return DemoData(
      keys=keys,
      images=images,
      clean_labels=clean,
      noisy_labels=noisy,
      verification=verification,
      features=np.asarray(features, dtype=np.float32),
      verified_classes=verified_classes,
      class_names=tuple(str(c) for c in range(NUM_CLASSES)),
      classifier_noisy_accuracy=float(np.mean(logits.argmax(axis=1) == noisy)),
      noise_rate=float(np.mean(noisy != clean)))
