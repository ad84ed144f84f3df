"""Convolutional backbones and the step-1 classifier built on them (Fig. 4).

The paper (Sec. 4.2) fine-tunes an ImageNet ResNet-50 on the noisy labels, then
uses its pool5 output (2048-d) as the image features f_v. Here a classifier is
``backbone -> dense head``, and the backbone, a sub-model named
``feature_extractor``, takes float pixels in [0, 255] and returns globally
average-pooled features, so the same network is reused unchanged for
extraction. Each backbone carries its own input preprocessing as a layer, so
the saved ``.keras`` models take raw pixels.
"""

import os
from typing import Optional, Sequence

import keras

from cleannet_tf.errors import InputError

FEATURE_EXTRACTOR = "feature_extractor"


@keras.saving.register_keras_serializable(package="cleannet_tf")
class Preprocess(keras.layers.Layer):
  """Maps pixels in [0, 255] to what a backbone was trained on.

  Modes: ``caffe`` (RGB -> BGR minus the ImageNet mean, ResNet-50), ``tf``
  (to [-1, 1], MobileNetV2), ``unit`` (to [0, 1]), ``none`` (EfficientNet
  rescales inside the model).
  """

  _BGR_MEAN = (103.939, 116.779, 123.68)

  def __init__(self, mode: str, **kwargs):
    super().__init__(**kwargs)
    if mode not in ("caffe", "tf", "unit", "none"):
      raise ValueError(f"unknown preprocessing mode {mode!r}")
    self.mode = mode

  def call(self, images):
    """images float [B, H, W, 3] -> float [B, H, W, 3]."""
    if self.mode == "caffe":
      return images[..., ::-1] - keras.ops.convert_to_tensor(
          self._BGR_MEAN, dtype=images.dtype)
    if self.mode == "tf":
      return images / 127.5 - 1.0
    if self.mode == "unit":
      return images / 255.0
    return images

  def get_config(self):
    return {**super().get_config(), "mode": self.mode}


def _residual_block(x, filters: int, stride: int, name: str):
  """Pre-activation-free basic block: 3x3 conv-BN-ReLU, 3x3 conv-BN, + skip."""
  shortcut = x
  if stride != 1 or x.shape[-1] != filters:
    shortcut = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False,
                                   name=f"{name}_proj")(x)
    shortcut = keras.layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
  y = keras.layers.Conv2D(filters, 3, strides=stride, padding="same",
                          use_bias=False, name=f"{name}_conv1")(x)
  y = keras.layers.BatchNormalization(name=f"{name}_bn1")(y)
  y = keras.layers.ReLU(name=f"{name}_relu1")(y)
  y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                          name=f"{name}_conv2")(y)
  y = keras.layers.BatchNormalization(name=f"{name}_bn2")(y)
  y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
  return keras.layers.ReLU(name=f"{name}_out")(y)


def small_resnet(input_shape: Sequence[int], widths: Sequence[int] = (32, 64, 128),
                 blocks_per_stage: int = 1) -> keras.Model:
  """A CIFAR-style ResNet for small (e.g. 32x32) images.

  A 3x3 stem, then one stage per width (the first at stride 1, the others
  halving the resolution), each of `blocks_per_stage` basic blocks; ResNet-20
  is widths (16, 32, 64) with 3 blocks per stage.

  Returns:
    Model float [B, H, W, 3] pixels in [0, 255] -> float [B, widths[-1]].
  """
  inputs = keras.Input(shape=tuple(input_shape), name="pixels")
  x = Preprocess("unit", name="preprocess")(inputs)
  x = keras.layers.Conv2D(widths[0], 3, padding="same", use_bias=False,
                          name="stem_conv")(x)
  x = keras.layers.BatchNormalization(name="stem_bn")(x)
  x = keras.layers.ReLU(name="stem_relu")(x)
  for stage, filters in enumerate(widths):
    for block in range(blocks_per_stage):
      stride = 2 if stage > 0 and block == 0 else 1
      x = _residual_block(x, filters, stride, f"stage{stage}_block{block}")
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  return keras.Model(inputs, x, name=FEATURE_EXTRACTOR)


# name -> (keras.applications constructor, preprocessing mode).
_APPLICATIONS = {
    "resnet50": (keras.applications.ResNet50, "caffe"),
    "mobilenet_v2": (keras.applications.MobileNetV2, "tf"),
    "efficientnet_b0": (keras.applications.EfficientNetB0, "none"),
}
BACKBONES = tuple(_APPLICATIONS) + ("small_resnet",)


def build_backbone(name: str, input_shape: Sequence[int],
                   weights: Optional[str] = None) -> keras.Model:
  """A feature extractor f_v: pixels in [0, 255] -> pooled features.

  Args:
    name: one of BACKBONES (``resnet50`` is the paper's, 2048-d).
    input_shape: (H, W, 3).
    weights: None (random init), ``"imagenet"`` (keras.applications
      pretrained weights; downloads them, not for ``small_resnet``), or a
      path to a weights file of this backbone (``.weights.h5``).

  Returns:
    Model named ``feature_extractor``: float [B, H, W, 3] -> float [B, D].
  """
  input_shape = tuple(input_shape)
  if name not in BACKBONES:
    raise InputError(f"--backbone: {name!r} is not one of {', '.join(BACKBONES)}")
  path = weights if weights not in (None, "imagenet") else None
  if path is not None and not os.path.isfile(path):
    raise InputError(f"--backbone_weights: {path}: no such file")
  if name == "small_resnet":
    if weights == "imagenet":
      raise InputError("--backbone_weights=imagenet: small_resnet has no "
                       "pretrained weights")
    model = small_resnet(input_shape)
  else:
    constructor, mode = _APPLICATIONS[name]
    inputs = keras.Input(shape=input_shape, name="pixels")
    x = Preprocess(mode, name="preprocess")(inputs)
    base = constructor(include_top=False, pooling="avg", input_shape=input_shape,
                       weights="imagenet" if weights == "imagenet" else None)
    model = keras.Model(inputs, base(x), name=FEATURE_EXTRACTOR)
  if path is not None:
    model.load_weights(path)
  return model


def build_classifier(backbone: keras.Model, num_classes: int) -> keras.Model:
  """backbone (f_v) -> dense softmax head (logits), as in Fig. 4.

  The head runs in float32 so that logits and the loss stay float32 under
  mixed precision.

  Returns:
    Model float [B, H, W, 3] pixels -> float32 logits [B, num_classes].
  """
  inputs = keras.Input(shape=backbone.input_shape[1:], name="pixels")
  features = backbone(inputs)
  logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(features)
  return keras.Model(inputs, logits, name="classifier")


def feature_extractor(classifier: keras.Model) -> keras.Model:
  """The backbone part of a ``build_classifier`` model: f_v, shared weights."""
  return classifier.get_layer(FEATURE_EXTRACTOR)
