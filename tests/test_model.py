"""The CleanNet layers and model: shapes, masking, attention, serialisation."""

import subprocess
import sys
import textwrap
import zipfile

import keras
import numpy as np
import pytest

from cleannet_tf import model as model_lib

SMALL = dict(num_classes=3, num_references=4, feature_dim=6, query_hidden_dim=8,
             embedding_dim=5, reference_hidden_dims=(7, 6), attention_dim=4)


def small_model(seed=0):
  keras.utils.set_random_seed(seed)
  model = model_lib.CleanNet(**SMALL)
  rng = np.random.default_rng(seed)
  model.reference_features.assign(rng.random((3, 4, 6)).astype("float32"))
  model.reference_counts.assign(np.array([4, 2, 1], "int32"))
  model.normalize.set_statistics(rng.random(6).astype("float32"),
                                 (0.5 + rng.random(6)).astype("float32"))
  return model


def queries(n=5, seed=1):
  rng = np.random.default_rng(seed)
  return {"features": rng.random((n, 6)).astype("float32"),
          "class_id": rng.integers(0, 3, n)}


def test_output_shapes_and_cosine_range():
  out = small_model()(queries())
  assert out["score"].shape == (5,)
  assert out["query_embedding"].shape == (5, 5)
  assert out["class_embedding"].shape == (5, 5)
  assert out["reconstruction"].shape == (5, 6)
  assert np.all(np.abs(out["score"]) <= 1 + 1e-6)


@pytest.mark.parametrize("mode,expected", [
    ("log1p", lambda x: np.sign(x) * np.log1p(np.abs(x))),
    ("l2", lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)),
    ("none", lambda x: x),
])
def test_feature_normalization(mode, expected):
  x = np.array([[0.0, 1.0, 3.0], [2.0, -0.5, 0.25]], np.float32)
  np.testing.assert_allclose(model_lib.FeatureNormalization(mode)(x), expected(x), rtol=1e-6)


def test_standardization_uses_the_set_statistics_and_leaves_constant_dims_unscaled():
  x = np.array([[0.0, 1.0, 3.0], [2.0, -0.5, 0.25]], np.float32)
  layer = model_lib.FeatureNormalization("log1p", standardize=True)
  layer.build(x.shape)
  mean, std = np.array([0.5, -1.0, 2.0], np.float32), np.array([2.0, 0.0, 0.5], np.float32)
  layer.set_statistics(mean, std)
  expected = (np.sign(x) * np.log1p(np.abs(x)) - mean) / np.array([2.0, 1.0, 0.5])
  np.testing.assert_allclose(layer(x), expected, rtol=1e-6)
  plain = model_lib.FeatureNormalization("log1p", standardize=False)
  assert not plain.weights and plain.get_config()["standardize"] is False
  with pytest.raises(ValueError, match="standardize"):
    plain.set_statistics(mean, std)


def test_feature_normalization_rejects_unknown_mode():
  with pytest.raises(ValueError, match="normalization"):
    model_lib.FeatureNormalization("zscore")


def test_attention_matches_equations_2_to_4_and_ignores_padding():
  layer = model_lib.ReferenceAttention(attention_dim=3)
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(2, 4, 5)).astype("float32")
  mask = np.array([[True, True, True, False], [True, False, False, False]])
  pooled, attention = layer(hidden, mask)
  w, b, u = (np.asarray(v) for v in (layer.projection, layer.projection_bias, layer.context))
  logits = np.tanh(hidden @ w + b) @ u
  for row, real in enumerate(mask.sum(axis=1)):
    alpha = np.exp(logits[row, :real]) / np.exp(logits[row, :real]).sum()
    np.testing.assert_allclose(attention[row, :real], alpha, rtol=1e-5)
    np.testing.assert_allclose(attention[row, real:], 0.0)
    np.testing.assert_allclose(pooled[row], alpha @ hidden[row, :real], rtol=1e-5, atol=1e-6)


def test_padding_references_do_not_change_class_embedding():
  model = small_model()
  before, _ = model.class_embeddings()
  padded = np.asarray(model.reference_features).copy()
  padded[1, 2:] = 123.0  # class 1 has 2 real references; the rest is padding
  model.reference_features.assign(padded)
  after, attention = model.class_embeddings()
  np.testing.assert_allclose(before, after, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(attention).sum(axis=1), 1.0, rtol=1e-6)


def test_scoring_with_precomputed_class_embeddings_matches_call():
  model = small_model()
  batch = queries()
  embeddings, _ = model.class_embeddings()
  np.testing.assert_allclose(
      model.score_with_class_embeddings(batch["features"], batch["class_id"], embeddings),
      model(batch)["score"], rtol=1e-5, atol=1e-6)


def test_call_with_every_class_embedding_matches_encoding_the_batch_classes():
  import tensorflow as tf
  model = small_model()
  batch = queries()
  with tf.GradientTape(persistent=True) as tape:
    encoded = model(batch, training=True)
    embeddings, _ = model.class_embeddings(training=True)
    given = model(batch, training=True, class_embeddings=embeddings)
    encoded_sum, given_sum = tf.reduce_sum(encoded["score"]), tf.reduce_sum(given["score"])
  np.testing.assert_allclose(given["score"], encoded["score"], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(given["class_embedding"], encoded["class_embedding"], atol=1e-7)
  for a, b in zip(tape.gradient(encoded_sum, model.trainable_variables),
                  tape.gradient(given_sum, model.trainable_variables)):
    assert (a is None) == (b is None)  # None: the decoder, which the score does not use
    if a is not None:
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_keras_file_round_trips_in_a_fresh_process(tmp_path):
  model = small_model()
  model.delta.assign(0.25)
  model.score_quartiles.assign(np.array([[0.1, 0.2, 0.3]] * 3, "float32"))
  model.verified_classes.assign(np.array([1, 0, 1], "int32"))
  path = str(tmp_path / "cleannet.keras")
  model.save(path)
  batch = queries()
  np.save(tmp_path / "features.npy", batch["features"])
  np.save(tmp_path / "class_id.npy", batch["class_id"])
  np.save(tmp_path / "expected.npy", np.asarray(model(batch)["score"]))
  script = textwrap.dedent(f"""
      import numpy as np, keras
      import cleannet_tf.model  # registers the classes with Keras
      model = keras.models.load_model({path!r})
      d = {str(tmp_path)!r}
      got = model({{"features": np.load(d + "/features.npy"),
                    "class_id": np.load(d + "/class_id.npy")}})["score"]
      np.testing.assert_allclose(got, np.load(d + "/expected.npy"), rtol=1e-6)
      assert abs(float(model.delta) - 0.25) < 1e-7
      np.testing.assert_allclose(model.score_quartiles, [[0.1, 0.2, 0.3]] * 3, rtol=1e-6)
      assert model.verified_classes.numpy().tolist() == [1, 0, 1]
      print("ok")
  """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
  assert result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_a_file_saved_before_the_score_quartiles_loads_with_one_delta(tmp_path):
  h5py = pytest.importorskip("h5py")
  model = small_model()
  model.delta.assign(0.25)
  path = tmp_path / "cleannet.keras"
  model.save(path)
  # Rewrite the file as the library wrote it before score_quartiles and
  # verified_classes: the model's own weights were the first three.
  with zipfile.ZipFile(path) as archive:
    members = {name: archive.read(name) for name in archive.namelist()}
  weights = tmp_path / "model.weights.h5"
  weights.write_bytes(members["model.weights.h5"])
  with h5py.File(weights, "r+") as store:
    own = store["vars"]
    assert sorted(own) == ["0", "1", "2", "3", "4"]
    del own["3"], own["4"]
  members["model.weights.h5"] = weights.read_bytes()
  old = tmp_path / "old.keras"
  with zipfile.ZipFile(old, "w") as archive:
    for name, content in members.items():
      archive.writestr(name, content)
  loaded = keras.models.load_model(old)
  assert float(loaded.delta) == pytest.approx(0.25)
  np.testing.assert_array_equal(loaded.reference_counts.numpy(), [4, 2, 1])
  assert loaded.verified_classes.numpy().tolist() == [1, 1, 1]
  batch = queries()
  np.testing.assert_allclose(loaded(batch)["score"], model(batch)["score"], rtol=1e-6)
