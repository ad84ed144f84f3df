"""SavedModel export: scores as Keras in a fresh process, signatures, atomicity."""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from cleannet_tf import data, export, scoring
from cleannet_tf.errors import InputError
from test_scoring import NUM_CLASSES, DIM, small_model

CLASSES = ["cat", "dog", "fish"]
IMAGE_SIZE = 16
N = 6


def tiny_backbone():
  """float32 images [N, 16, 16, 3] in [0, 255] -> features [N, DIM] >= 0."""
  keras.utils.set_random_seed(1)
  return keras.Sequential([
      keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3)), keras.layers.Rescaling(1 / 255),
      keras.layers.Conv2D(DIM, 3), keras.layers.GlobalAveragePooling2D(), keras.layers.ReLU()])


def sample_inputs():
  """Features [N, D], class ids [N] and PNG-encoded images [N] (two sizes)."""
  rng = np.random.default_rng(2)
  pixels = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            for size in [IMAGE_SIZE] * (N - 2) + [24, 9]]
  return {"features": rng.random((N, DIM)).astype(np.float32),
          "class_id": rng.integers(0, NUM_CLASSES, N).astype(np.int64),
          "images": np.array([tf.io.encode_png(p).numpy() for p in pixels], dtype=object),
          "pixels": pixels}


def image_features(backbone, pixels):
  """What score_images feeds the model: resized float32 images through the backbone."""
  return backbone(np.stack([tf.image.resize(p, [IMAGE_SIZE, IMAGE_SIZE]) for p in pixels]))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(version dir, the .keras path, the backbone, sample inputs) of one export."""
  root = tmp_path_factory.mktemp("export")
  model, backbone, inputs = small_model(), tiny_backbone(), sample_inputs()
  # Fish had no verification labels: its threshold is delta (0.2) moved to
  # the middle of its scores (median -0.9 against 0.2 for the verified classes).
  model.score_quartiles.assign(np.array([[0.0, 0.2, 0.4], [0.0, 0.2, 0.4], [-0.95, -0.9, -0.85]],
                                        np.float32))
  model.verified_classes.assign(np.array([1, 1, 0], np.int32))
  keras_path = str(root / "model.keras")
  model.save(keras_path)
  path = export.export_savedmodel(
      model, CLASSES, str(root / "export"), backbone=backbone,
      warmup={"features": inputs["features"][:3], "class_id": inputs["class_id"][:3]})
  return path, keras_path, backbone, inputs


# Runs in a fresh interpreter that never imports cleannet_tf: the SavedModel
# must be self-contained, as it is for TF Serving.
_LOAD_AND_SCORE = """
import sys
import numpy as np
import tensorflow as tf
path, inputs, outputs = sys.argv[1:]
loaded = tf.saved_model.load(path)
x = np.load(inputs, allow_pickle=True)
results = {}
for name, args in [("serving_default", ("features", "class_id")),
                   ("score_all_classes", ("features",)),
                   ("score_images", ("images", "class_id"))]:
  out = loaded.signatures[name](**{a: tf.constant(x[a]) for a in args})
  results.update({f"{name}/{k}": v.numpy() for k, v in out.items()})
assert not [m for m in sys.modules if m.startswith("cleannet_tf")]
np.savez(outputs, **results)
"""


def test_fresh_process_scores_like_the_reloaded_keras_model(exported, tmp_path):
  path, keras_path, backbone, inputs = exported
  np.savez(tmp_path / "in.npz", **{k: inputs[k] for k in ("features", "class_id", "images")})
  result = subprocess.run([sys.executable, "-c", _LOAD_AND_SCORE, path, str(tmp_path / "in.npz"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  got = np.load(tmp_path / "out.npz")

  # The .keras file as user code loads it (cleannet_tf imported registers the layers).
  model = keras.models.load_model(keras_path)
  features, class_id = inputs["features"], inputs["class_id"]
  score = model({"features": features, "class_id": class_id})["score"].numpy()
  np.testing.assert_allclose(got["serving_default/score"], score, atol=1e-5)
  thresholds = scoring.class_thresholds(model)
  np.testing.assert_allclose(thresholds, [0.2, 0.2, -0.9], atol=1e-6)
  np.testing.assert_array_equal(got["serving_default/is_clean"], score >= thresholds[class_id])
  assert ((score >= thresholds[class_id]) != (score >= 0.2)).any()  # one delta would differ
  assert got["serving_default/is_clean"].dtype == np.int64
  np.testing.assert_allclose(got["serving_default/weight_soft"], np.maximum(score, 0), atol=1e-5)

  every = np.repeat(features, NUM_CLASSES, axis=0)
  all_ids = np.tile(np.arange(NUM_CLASSES), N)
  all_scores = model({"features": every, "class_id": all_ids})["score"].numpy()
  np.testing.assert_allclose(got["score_all_classes/scores"],
                             all_scores.reshape(N, NUM_CLASSES), atol=1e-5)

  from_images = model({"features": image_features(backbone, inputs["pixels"]),
                       "class_id": class_id})["score"].numpy()
  np.testing.assert_allclose(got["score_images/score"], from_images, atol=1e-5)
  np.testing.assert_allclose(got["score_images/weight_soft"], np.maximum(from_images, 0),
                             atol=1e-5)


def _signature_blocks(cli_output):
  """saved_model_cli show --all -> {signature: {"inputs"/"outputs": {name: (dtype, shape)}}}."""
  signatures = {}
  for name, block in re.findall(r"signature_def\['(\w+)'\]:(.*?)Method name", cli_output, re.S):
    parts = block.split("contains the following output(s):")
    signatures[name] = {
        side: {tensor: (dtype, shape) for tensor, dtype, shape in re.findall(
            r"\['(\w+)'\] tensor_info:\s*dtype: (\w+)\s*shape: ([^\n]+)", text)}
        for side, text in zip(("inputs", "outputs"), parts)}
  return signatures


def test_saved_model_cli_lists_the_documented_signatures(exported):
  cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
  result = subprocess.run([cli, "show", "--all", "--dir", exported[0]],
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  signatures = _signature_blocks(result.stdout)
  scored = {"score": ("DT_FLOAT", "(-1)"), "is_clean": ("DT_INT64", "(-1)"),
            "weight_soft": ("DT_FLOAT", "(-1)")}
  assert signatures["serving_default"] == {
      "inputs": {"features": ("DT_FLOAT", f"(-1, {DIM})"), "class_id": ("DT_INT64", "(-1)")},
      "outputs": scored}
  assert signatures["score_all_classes"] == {
      "inputs": {"features": ("DT_FLOAT", f"(-1, {DIM})")},
      "outputs": {"scores": ("DT_FLOAT", f"(-1, {NUM_CLASSES})")}}
  assert signatures["score_images"] == {
      "inputs": {"images": ("DT_STRING", "(-1)"), "class_id": ("DT_INT64", "(-1)")},
      "outputs": scored}


def test_class_id_out_of_range_is_invalid_argument(exported):
  loaded = tf.saved_model.load(exported[0])
  features = exported[3]["features"][:2]
  for bad in ([0, NUM_CLASSES], [-1, 0]):
    with pytest.raises(tf.errors.InvalidArgumentError, match="class_id"):
      loaded.signatures["serving_default"](features=tf.constant(features),
                                           class_id=tf.constant(bad, tf.int64))


def test_assets_and_warmup_requests(exported):
  path, _, _, inputs = exported
  with open(os.path.join(path, "assets", "classes.txt"), encoding="utf-8") as f:
    assert f.read().splitlines() == CLASSES
  logs = [prediction_log_pb2.PredictionLog.FromString(record.numpy())
          for record in tf.data.TFRecordDataset(os.path.join(path, export.WARMUP_FILE))]
  requests = [log.predict_log.request for log in logs]
  assert {r.model_spec.signature_name for r in requests} == {"serving_default",
                                                            "score_all_classes"}
  assert {r.model_spec.name for r in requests} == {"cleannet"}
  full = [r for r in requests if r.model_spec.signature_name == "serving_default"][-1]
  np.testing.assert_array_equal(tf.make_ndarray(full.inputs["features"]),
                                inputs["features"][:3])
  np.testing.assert_array_equal(tf.make_ndarray(full.inputs["class_id"]), inputs["class_id"][:3])


def test_versions_count_up_and_are_never_overwritten(tmp_path, monkeypatch):
  model, root = small_model(), str(tmp_path / "export")
  os.makedirs(os.path.join(root, "cleannet", "7"))
  os.makedirs(os.path.join(root, "cleannet", "not-a-version"))
  path = export.export_savedmodel(model, CLASSES, root)
  assert path == os.path.join(root, "cleannet", "8")
  assert os.path.isfile(os.path.join(path, "saved_model.pb"))
  assert not os.path.exists(os.path.join(path, "assets.extra"))
  with pytest.raises(InputError, match="version 8 already exists"):
    export.export_savedmodel(model, CLASSES, root, version=8)
  with pytest.raises(InputError, match="2 class names"):
    export.export_savedmodel(model, CLASSES[:2], root)
  with pytest.raises(InputError, match="backbone maps"):
    export.export_savedmodel(model, CLASSES, root, backbone=keras.Sequential(
        [keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3)), keras.layers.GlobalAveragePooling2D()]))

  def disk_full(*args, **kwargs):
    raise OSError("No space left on device")

  monkeypatch.setattr(tf.saved_model, "save", disk_full)
  with pytest.raises(OSError, match="No space"):
    export.export_savedmodel(model, CLASSES, root)
  # Neither a failed export nor a refused one leaves anything behind.
  assert sorted(os.listdir(os.path.join(root, "cleannet"))) == ["7", "8", "not-a-version"]


def test_export_tool_writes_the_next_version_with_warmup_and_backbone(exported, tmp_path):
  rng = np.random.default_rng(3)
  features = data.write_features(str(tmp_path / "features"), np.array(["a", "b", "c"]),
                                 rng.random((3, DIM)).astype(np.float32), np.array([0, 1, 2]),
                                 np.array([1, -1, 0]), CLASSES)
  backbone_path = str(tmp_path / "backbone.keras")
  exported[2].save(backbone_path)
  root = tmp_path / "export"
  os.makedirs(root / "cleannet" / "1")
  command = [sys.executable, "-m", "tools.export_savedmodel", f"--model={exported[1]}",
             f"--output_dir={root}", f"--warmup_features={features.directory}",
             f"--backbone={backbone_path}"]
  result = subprocess.run(command, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.listdir(root / "cleannet" / "2" / "assets.extra") == ["tf_serving_warmup_requests"]
  assert sorted(os.listdir(root / "cleannet")) == ["1", "2"]
