"""Image inputs, backbones and step-1 training."""

import dataclasses
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cleannet_tf import backbones, classifier, extraction, images
from cleannet_tf.errors import InputError
from image_fixture import CLASSES, write_images


def test_manifest_resolves_paths_labels_and_verification(tmp_path):
  path = write_images(tmp_path, n=6)
  source = images.read_manifest(path, class_names=CLASSES)
  assert source.num_rows == 6 and source.class_names == CLASSES
  assert source.keys[0] == "img/000.jpg"
  assert source.paths[0] == os.path.join(str(tmp_path), "img/000.jpg")
  np.testing.assert_array_equal(source.class_ids, [0, 1, 2, 0, 2, 2])
  np.testing.assert_array_equal(source.verification, [1, 1, 1, -1, -1, -1])
  # Without class names: the sorted unique labels.
  assert images.read_manifest(path).class_names == ("dark", "light", "mid")


def test_tsv_manifest_with_ids_and_keys(tmp_path):
  (tmp_path / "m.tsv").write_text("key\tlabel\tpath\nk1\t2\t/a.jpg\nk2\t0\tb.png\n")
  source = images.read_manifest(tmp_path / "m.tsv")
  assert source.class_names == ("0", "1", "2")
  np.testing.assert_array_equal(source.class_ids, [2, 0])
  assert list(source.keys) == ["k1", "k2"] and source.paths[0] == "/a.jpg"


@pytest.mark.parametrize("body,expected", [
    ("path,verification\na.jpg,1\n", "m.csv:1: header lacks column(s) ['label']"),
    ("path,label\na.jpg,cat\nb.jpg,cow\n", "m.csv:3: label 'cow'"),
    ("path,label,verification\na.jpg,cat,2\n", "m.csv:2: verification '2'"),
    ("path,label\na.jpg,cat\na.jpg,dog\n", "m.csv:3: duplicate key 'a.jpg' (first on line 2)"),
    ("path,label\n,cat\n", "m.csv:2: empty path"),
])
def test_manifest_errors_name_file_and_line(tmp_path, body, expected):
  (tmp_path / "m.csv").write_text(body)
  with pytest.raises(InputError) as error:
    images.read_manifest(tmp_path / "m.csv", class_names=["cat", "dog"])
  assert str(error.value).startswith(str(tmp_path / expected))


def test_folder_manifest(tmp_path):
  write_images(tmp_path, n=3)
  for i, name in enumerate(["b", "a"]):
    os.makedirs(tmp_path / "tree" / name)
    os.replace(tmp_path / f"img/00{i}.{'png' if i else 'jpg'}",
               tmp_path / "tree" / name / f"x{i}.{'png' if i else 'jpg'}")
  source = images.folder_manifest(tmp_path / "tree")
  assert source.class_names == ("a", "b")
  assert list(source.keys) == ["a/x1.png", "b/x0.jpg"]
  np.testing.assert_array_equal(source.class_ids, [0, 1])


def test_image_dataset_decodes_and_drops_bad_rows_with_reasons(tmp_path):
  path = write_images(tmp_path, n=4)
  (tmp_path / "img" / "bad.jpg").write_bytes(b"not an image")
  with open(path, "a", encoding="utf-8") as f:
    f.write("img/bad.jpg,dark,\nimg/gone.jpg,mid,-1\n")
  source = images.read_manifest(path)
  batches = list(images.image_dataset(source, (8, 8), batch_size=3))
  index = np.concatenate([b["index"].numpy() for b in batches])
  np.testing.assert_array_equal(index, [0, 1, 2, 3])
  assert batches[0]["image"].shape == (3, 8, 8, 3)
  rejects = images.rejected_rows(source, (8, 8), [4, 5])
  assert [r[0] for r in rejects] == ["img/bad.jpg", "img/gone.jpg"]
  assert "Unknown image file format" in rejects[0][2]
  assert "No such file" in rejects[1][2]


def test_tfds_source_reads_the_label_key(tmp_path):
  # cifar10_n is read the same way with label_key="worse_label".
  with tfds.testing.mock_data(num_examples=8):
    source = images.tfds_source("cifar10", "train", label_key="label")
    assert source.num_rows == 8 and len(source.class_names) == 10
    rows = list(images.image_dataset(source, (32, 32), batch_size=8, start=2))[0]
    labels = [int(e["label"]) for e in tfds.load("cifar10", split="train")]
  assert rows["image"].shape == (6, 32, 32, 3)
  np.testing.assert_array_equal(rows["class_id"], labels[2:])
  assert rows["key"][0] == b"cifar10/train[2]"
  with tfds.testing.mock_data(num_examples=8):
    with pytest.raises(InputError, match="no 'worse_label'"):
      images.tfds_source("cifar10", label_key="worse_label")


@pytest.mark.parametrize("name,dim", [("resnet50", 2048), ("mobilenet_v2", 1280),
                                      ("efficientnet_b0", 1280), ("small_resnet", 128)])
def test_backbones_give_pooled_features(name, dim):
  backbone = backbones.build_backbone(name, (32, 32, 3), weights=None)
  model = backbones.build_classifier(backbone, 3)
  assert backbone.output_shape == (None, dim)
  assert model.output_shape == (None, 3)
  assert backbones.feature_extractor(model) is backbone


def test_backbone_weights_from_a_file(tmp_path):
  first = backbones.build_backbone("small_resnet", (16, 16, 3))
  first.save_weights(str(tmp_path / "w.weights.h5"))
  second = backbones.build_backbone("small_resnet", (16, 16, 3),
                                    weights=str(tmp_path / "w.weights.h5"))
  x = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
  np.testing.assert_allclose(first(x), second(x), rtol=1e-6)


def _config(steps):
  return classifier.ClassifierConfig(image_size=(16, 16), steps=steps,
                                     global_batch_size=8, checkpoint_every=2,
                                     log_every=2, learning_rate=0.05)


@pytest.mark.parametrize("weighted", [False, True])
def test_step1_resume_matches_a_straight_run(tmp_path, weighted):
  source = images.read_manifest(write_images(tmp_path))
  # Weighted: step 3's default, rows drawn by weight (a third never).
  weights = (np.arange(source.num_rows) % 3 / 2).astype(np.float32) if weighted else None
  straight = classifier.ClassifierTrainer(source, str(tmp_path / "a"), _config(6),
                                          sample_weights=weights)
  straight.train()
  killed = classifier.ClassifierTrainer(source, str(tmp_path / "b"), _config(6),
                                        sample_weights=weights)
  step = killed._train_step
  def step_then_die(*batch):
    if killed.step == 3:  # after the checkpoint at step 2
      raise KeyboardInterrupt
    return step(*batch)
  killed._train_step = step_then_die
  with pytest.raises(KeyboardInterrupt):
    killed.train()
  resumed = classifier.ClassifierTrainer(source, str(tmp_path / "b"), _config(6),
                                         sample_weights=weights)
  resumed.manager.restore_or_initialize()
  assert resumed.step == 2
  summary = resumed.train(test_source=source)
  assert summary["steps"] == 6 and summary["test_images"] == 30
  for a, b in zip(straight.model.weights, resumed.model.weights):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
  extractor = extraction.load_feature_extractor(
      str(tmp_path / "b" / classifier.FEATURE_EXTRACTOR_FILE))
  x = np.full((1, 16, 16, 3), 128.0, np.float32)
  np.testing.assert_allclose(extractor(x), backbones.feature_extractor(resumed.model)(x),
                             rtol=1e-5)


def _drawn_rows(source, weights, seed):
  stream = classifier.draw_by_weight(source.records().repeat(), weights, seed)
  return next(iter(stream.map(lambda record: record["index"]).batch(5000))).numpy()


def test_sampling_draws_rows_in_proportion_to_their_weight(tmp_path):
  source = images.read_manifest(write_images(tmp_path))
  weights = np.zeros(source.num_rows, np.float32)
  weights[:10], weights[10:20] = 1.0, 0.25
  drawn = _drawn_rows(source, weights, seed=0)
  counts = np.bincount(drawn, minlength=source.num_rows)
  assert counts[20:].sum() == 0 and counts[:20].min() > 0
  assert 3.5 < counts[:10].sum() / counts[10:20].sum() < 4.6
  np.testing.assert_array_equal(_drawn_rows(source, weights, seed=0), drawn)
  assert not np.array_equal(_drawn_rows(source, weights, seed=1), drawn)


def test_weights_enter_batches_by_sampling_or_in_the_loss(tmp_path):
  source = images.read_manifest(write_images(tmp_path))
  weights = np.where(source.class_ids == 0, 0.5, 0.0).astype(np.float32)
  sampled = classifier.training_dataset(source, _config(1), 0, sample_weights=weights)
  for _, labels, batch_weights in sampled.take(4):
    np.testing.assert_array_equal(labels, 0)
    np.testing.assert_array_equal(batch_weights, 1.0)
  in_loss = classifier.training_dataset(
      source, dataclasses.replace(_config(1), sample_weighting="loss"), 0,
      sample_weights=weights)
  _, labels, batch_weights = next(iter(in_loss))
  assert set(labels.numpy()) == {0, 1, 2}
  np.testing.assert_array_equal(batch_weights, np.where(labels == 0, 0.5, 0.0))


@pytest.mark.parametrize("config, weights, message", [
    (dataclasses.replace(_config(1), sample_weighting="drop"), None,
     "--sample_weighting='drop': not one of sampling, loss"),
    (_config(1), 0.0, "sample weights: all 0, no row can be drawn"),
])
def test_bad_sample_weighting_is_refused(tmp_path, config, weights, message):
  source = images.read_manifest(write_images(tmp_path))
  with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
    classifier.ClassifierTrainer(
        source, str(tmp_path / "m"), config,
        sample_weights=None if weights is None else np.full(source.num_rows, weights))


def test_step1_under_mirrored_strategy(tmp_path, two_cpu_strategy):
  source = images.read_manifest(write_images(tmp_path))
  trainer = classifier.ClassifierTrainer(source, str(tmp_path / "m"), _config(2),
                                         two_cpu_strategy)
  assert trainer.train()["steps"] == 2
