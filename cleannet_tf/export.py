"""SavedModel export of a trained CleanNet for the stock TF Serving container.

``export_savedmodel`` writes ``<output_dir>/<model_name>/<version>/``, the
layout ``tensorflow/serving`` loads as is (it serves the highest numeric
version). The graph holds:

* the L class embeddings [L, E], computed once at export time: the reference
  set encoder and the reference features [L, K, D] stay out of the export;
* the feature normalisation, the query encoder and each class's threshold
  (``scoring.class_thresholds``: delta, moved for classes without
  verification labels);
* optionally a feature backbone (a Keras model mapping images to features).

Signatures (N is the batch, any size):

* ``serving_default``: ``features`` float32 [N, D], ``class_id`` int64 [N] ->
  ``score`` float32 [N] (cosine similarity to the noisy class), ``is_clean``
  int64 [N] (1 where score >= the class's threshold, else 0: an integer, like the is_clean
  column of cleannet-score, so that JSON and TSV consumers need no boolean
  handling), ``weight_soft`` float32 [N] (max(0, score), eq. 12).
* ``score_all_classes``: ``features`` float32 [N, D] -> ``scores`` float32
  [N, L], the score of every row against every class.
* ``score_images`` (exports with a backbone only): ``images`` string [N]
  (encoded JPEG, PNG, GIF or BMP bytes), ``class_id`` int64 [N] -> the outputs
  of ``serving_default``. Images are decoded to RGB, resized to the backbone's
  input size and passed as float32 in [0, 255]; the backbone applies its own
  preprocessing.

A class id outside [0, L) fails the request with InvalidArgument. Class names
ship as ``assets/classes.txt`` (line i = class id i), and
``assets.extra/tf_serving_warmup_requests`` holds PredictionLogs built from a
few real rows, which TF Serving replays before it reports the model ready.
"""

import os
import re
import shutil
import tempfile

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from cleannet_tf import scoring
from cleannet_tf.errors import InputError

CLASSES_ASSET = "classes.txt"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
SCORE_SIGNATURE = "serving_default"
ALL_CLASSES_SIGNATURE = "score_all_classes"
IMAGES_SIGNATURE = "score_images"
# Temporary export directories start with a dot: TF Serving only considers
# numeric version directories, so it never loads a half-written one.
_TMP_PREFIX = ".tmp-"


class ServingModule(tf.Module):
  """What the SavedModel holds: class embeddings, query encoder, thresholds, backbone.

  Only the layers that run at serving time are tracked, so the export carries
  neither the reference features nor the reference encoder nor the decoder.
  Besides ``.signatures[...]``, the loaded object has the traced functions as
  attributes named like the signatures.
  """

  def __init__(self, model, class_names_path, backbone=None, image_size=None):
    """Precomputes the class embeddings of `model`.

    Args:
      model: a ``model_lib.CleanNet``.
      class_names_path: a file named ``classes.txt`` to ship as an asset.
      backbone: None, or a Keras model mapping float32 images [N, S, S, 3] in
        [0, 255] to features [N, D].
      image_size: S, the side images are resized to; required with a backbone.
    """
    super().__init__(name="cleannet_serving")
    # Bound methods, not the model: tracking the model would put the reference
    # features and encoders into the SavedModel.
    self._score_with_class_embeddings = model.score_with_class_embeddings
    self._query_embeddings = model.query_embeddings
    # The layers those methods run, so that their weights are saved; the
    # decoder half of the query autoencoder is not needed for scoring.
    self.query_layers = [model.normalize, model.query_encoder.encoder_hidden,
                         model.query_encoder.encoder_embedding]
    embeddings, _ = model.class_embeddings()
    self.class_embeddings = tf.Variable(embeddings, trainable=False, name="class_embeddings")
    # Each class's threshold (its delta, moved for classes without
    # verification labels): the model's weights are not saved, only these.
    self.thresholds = tf.Variable(scoring.class_thresholds(model).astype(np.float32),
                                  trainable=False, name="thresholds")
    self.class_names = tf.saved_model.Asset(class_names_path)
    self.backbone = backbone
    self.image_size = image_size
    self.num_classes = model.num_classes

    features = tf.TensorSpec([None, model.feature_dim], tf.float32, name="features")
    class_id = tf.TensorSpec([None], tf.int64, name="class_id")
    self.serving_default = tf.function(self._score, input_signature=[features, class_id])
    self.score_all_classes = tf.function(self._score_all_classes, input_signature=[features])
    if backbone is not None:
      images = tf.TensorSpec([None], tf.string, name="images")
      self.score_images = tf.function(self._score_images, input_signature=[images, class_id])

  def signatures(self):
    """{signature name: traced function}, for tf.saved_model.save."""
    names = [SCORE_SIGNATURE, ALL_CLASSES_SIGNATURE]
    if self.backbone is not None:
      names.append(IMAGES_SIGNATURE)
    return {name: getattr(self, name) for name in names}

  def _check_class_id(self, class_id):
    """Fails the request (InvalidArgument) for an id outside [0, L).

    tf.gather would raise on CPU but silently return zeros on GPU, so the
    range is checked explicitly before any lookup.
    """
    return [
        tf.debugging.assert_non_negative(class_id, message="class_id must be >= 0"),
        tf.debugging.assert_less(class_id, tf.constant(self.num_classes, tf.int64),
                                 message=f"class_id must be < {self.num_classes}"),
    ]

  def _score(self, features, class_id):
    """features float32 [N, D], class_id int64 [N] -> dict of [N] outputs."""
    with tf.control_dependencies(self._check_class_id(class_id)):
      class_id = tf.identity(class_id)
    score = self._score_with_class_embeddings(features, class_id, self.class_embeddings)
    return {"score": score,
            "is_clean": tf.cast(score >= tf.gather(self.thresholds, class_id), tf.int64),
            "weight_soft": tf.maximum(score, 0.0)}

  def _score_all_classes(self, features):
    """features float32 [N, D] -> {"scores": float32 [N, L]}."""
    # A matmul of unit vectors: a broadcast cosine_similarity would build an
    # [N, L, E] intermediate, gigabytes at N = 4096, L = 1000.
    query = tf.math.l2_normalize(self._query_embeddings(features), axis=-1)
    classes = tf.math.l2_normalize(self.class_embeddings, axis=-1)
    return {"scores": tf.matmul(query, classes, transpose_b=True)}

  def _score_images(self, images, class_id):
    """images string [N] (encoded), class_id int64 [N] -> as ``_score``."""
    return self._score(self.backbone(decode_images(images, self.image_size)), class_id)


def decode_images(images, image_size):
  """Encoded images string [N] -> float32 [N, S, S, 3] RGB in [0, 255]."""

  def decode(encoded):
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return tf.image.resize(image, [image_size, image_size])

  # Images differ in size until resized, so each is decoded on its own.
  return tf.map_fn(decode, images, fn_output_signature=tf.TensorSpec(
      [image_size, image_size, 3], tf.float32))


def backbone_image_size(backbone):
  """The square input side S of a backbone taking [N, S, S, 3], else None."""
  shape = backbone.input_shape
  if isinstance(shape, tuple) and len(shape) == 4 and shape[1] == shape[2] and shape[1]:
    return int(shape[1])
  return None


def next_version(model_dir):
  """1 + the largest numeric version directory in `model_dir` (1 if none)."""
  names = os.listdir(model_dir) if os.path.isdir(model_dir) else []
  versions = [int(name) for name in names if re.fullmatch(r"\d+", name)]
  return max(versions, default=0) + 1


def warmup_requests(model_name, features, class_id, images=None):
  """PredictionLogs for TF Serving's warm-up, one per signature and batch size.

  Args:
    model_name: the name the server serves the model under.
    features: float32 [n, D], a few real rows.
    class_id: int64 [n].
    images: None, or encoded images [n] for ``score_images``.

  Returns:
    A list of ``PredictionLog``: each signature at batch 1 and batch n, so the
    first real requests of both shapes find their kernels ready.
  """
  features = np.asarray(features, np.float32)
  class_id = np.asarray(class_id, np.int64)
  inputs = {SCORE_SIGNATURE: {"features": features, "class_id": class_id},
            ALL_CLASSES_SIGNATURE: {"features": features}}
  if images is not None:
    inputs[IMAGES_SIGNATURE] = {"images": np.asarray(images, object), "class_id": class_id}
  logs = []
  for signature, tensors in inputs.items():
    for rows in sorted({1, len(features)}):
      request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(
          name=model_name, signature_name=signature))
      for name, value in tensors.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value[:rows]))
      logs.append(prediction_log_pb2.PredictionLog(
          predict_log=prediction_log_pb2.PredictLog(request=request)))
  return logs


def export_savedmodel(model, class_names, output_dir, model_name="cleannet", version=None,
                      backbone=None, image_size=None, warmup=None):
  """Writes ``<output_dir>/<model_name>/<version>/`` atomically.

  The SavedModel is written to a hidden temporary directory beside the target
  and renamed into place, so TF Serving never sees a partial version.

  Args:
    model: a trained ``model_lib.CleanNet``.
    class_names: L names, index = class id.
    output_dir: the export root, e.g. ``export``.
    model_name: the directory (and served model) name.
    version: a non-negative integer; None for 1 + the largest existing one.
    backbone: None, or a Keras model mapping images [N, S, S, 3] to features
      [N, D] (see ``ServingModule``).
    image_size: S; None to take it from the backbone's input shape.
    warmup: None, or a dict with "features" float32 [n, D] and "class_id"
      int64 [n] (and optionally "images", encoded bytes [n]), n >= 1 real
      rows for the warm-up requests.

  Returns:
    The path of the written version directory.

  Raises:
    InputError: the version exists or is negative, the class names do not
      match the model, or the backbone does not fit the model.
  """
  if len(class_names) != model.num_classes:
    raise InputError(f"{len(class_names)} class names for a model of {model.num_classes} "
                     "classes")
  if backbone is not None:
    image_size = image_size or backbone_image_size(backbone)
    if not image_size:
      raise InputError(f"backbone input shape {backbone.input_shape} is not [N, S, S, 3]: "
                       "give --image_size")
    width = backbone.compute_output_shape((1, image_size, image_size, 3))
    if tuple(width) != (1, model.feature_dim):
      raise InputError(f"backbone maps {image_size}x{image_size} images to {tuple(width)}, "
                       f"the model expects features of shape (N, {model.feature_dim})")
  if warmup is not None and "images" in warmup and backbone is None:
    raise InputError("warm-up images need a backbone: without one there is no "
                     f"{IMAGES_SIGNATURE} signature")
  model_dir = os.path.join(output_dir, model_name)
  version = next_version(model_dir) if version is None else int(version)
  if version < 0:
    raise InputError(f"version must be >= 0, got {version}")
  target = os.path.join(model_dir, str(version))
  if os.path.exists(target):
    raise InputError(f"{target}: version {version} already exists; TF Serving may be "
                     "serving it, so it is never overwritten")
  os.makedirs(model_dir, exist_ok=True)
  # Unique per export, so two concurrent exports never share a directory.
  temporary = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{version}-", dir=model_dir)
  try:
    saved = os.path.join(temporary, "model")
    names_dir = os.path.join(temporary, "names")
    os.makedirs(names_dir)
    names_path = os.path.join(names_dir, CLASSES_ASSET)
    with open(names_path, "w", encoding="utf-8") as f:
      f.write("".join(f"{name}\n" for name in class_names))
    module = ServingModule(model, names_path, backbone, image_size)
    tf.saved_model.save(module, saved, signatures=module.signatures())
    if warmup is not None:
      os.makedirs(os.path.join(saved, "assets.extra"))
      with tf.io.TFRecordWriter(os.path.join(saved, WARMUP_FILE)) as writer:
        for log in warmup_requests(model_name, **warmup):
          writer.write(log.SerializeToString())
    try:
      # rename(2) fails on a non-empty target: a version written meanwhile by
      # another export is not replaced.
      os.rename(saved, target)
    except OSError as error:
      raise InputError(f"{target}: cannot move the export into place ({error.strerror})") \
          from None
  finally:
    shutil.rmtree(temporary, ignore_errors=True)
  return target

