"""Images -> step 1 -> features in parts -> reference sets -> CleanNet -> scores."""

import os
import subprocess
import sys

import numpy as np
import pytest

from cleannet_tf import (backbones, classifier, data, extraction, images,
                         references, scoring, training)
from cleannet_tf.errors import InputError
from image_fixture import write_images


def tiny_extractor():
  return backbones.build_backbone("small_resnet", (16, 16, 3))


@pytest.fixture(name="manifest")
def _manifest(tmp_path):
  return write_images(tmp_path)


def test_images_to_scores_end_to_end(tmp_path, manifest):
  source = images.read_manifest(manifest)
  config = classifier.ClassifierConfig(image_size=(16, 16), steps=3,
                                       global_batch_size=8, log_every=1)
  step1 = classifier.ClassifierTrainer(source, str(tmp_path / "step1"), config)
  assert step1.train(test_source=source)["test_images"] == 30
  extractor = extraction.load_feature_extractor(
      str(tmp_path / "step1" / classifier.FEATURE_EXTRACTOR_FILE))
  parts = extraction.extract_features(source, extractor, str(tmp_path / "feats"),
                                      num_shards=2, batch_size=8)
  info = extraction.merge_feature_sets(parts, str(tmp_path / "feats" / "all"))
  assert info.num_rows == 30 and info.dim == 128
  rows = data.load_arrays(info, verification="all")
  np.testing.assert_array_equal(rows["key"].astype(str), source.keys)
  np.testing.assert_array_equal(rows["verification"], source.verification)
  refs = references.build_references_streamed(info, k=3)
  model_config = dict(num_classes=3, num_references=3, feature_dim=info.dim,
                      query_hidden_dim=16, embedding_dim=8,
                      reference_hidden_dims=(16, 8), attention_dim=8)
  train_config = training.TrainConfig(steps=4, global_batch_size=8, eval_every=2,
                                      checkpoint_every=2, log_every=2,
                                      shuffle_buffer=16, val_fraction=0.3)
  result = training.Trainer(model_config, refs, info, str(tmp_path / "cleannet"),
                            train_config).train()
  summary = scoring.score_feature_set(result.model, info, str(tmp_path / "scores"))
  assert summary.rows == 30


def test_a_finished_step1_is_reused_elsewhere_with_its_top1_measured_again(tmp_path,
                                                                            manifest):
  source = images.read_manifest(manifest)
  config = classifier.ClassifierConfig(image_size=(16, 16), steps=2, global_batch_size=8)
  trained = classifier.ClassifierTrainer(source, str(tmp_path / "a"), config).train()
  assert "test_top1" not in trained
  reused = classifier.reuse_finished(str(tmp_path / "a"), str(tmp_path / "b"), source)
  assert reused["reused_from"] == str(tmp_path / "a") and reused["test_images"] == 30
  for name in (classifier.CLASSIFIER_FILE, classifier.FEATURE_EXTRACTOR_FILE):
    assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()
  # A rerun keeps the copy; another source, or a folder trained there, is refused.
  assert classifier.reuse_finished(str(tmp_path / "a"), str(tmp_path / "b")) == reused
  with pytest.raises(InputError, match="copied from .*/a, not .*/c's"):
    classifier.reuse_finished(str(tmp_path / "c"), str(tmp_path / "b"))
  with pytest.raises(InputError, match="trained there"):
    classifier.reuse_finished(str(tmp_path / "b"), str(tmp_path / "a"))
  (tmp_path / "unfinished").mkdir()
  with pytest.raises(InputError, match="unfinished: no classifier.keras; not a finished"):
    classifier.reuse_finished(str(tmp_path / "unfinished"), str(tmp_path / "d"))


def test_unreadable_images_go_to_rejects_and_nothing_else_is_lost(tmp_path, manifest):
  (tmp_path / "img" / "bad.jpg").write_bytes(b"\xff\xd8\xff truncated jpeg")
  with open(manifest, "a", encoding="utf-8") as f:
    f.write("img/bad.jpg,dark,\nimg/gone.png,mid,-1\n")
  source = images.read_manifest(manifest)
  parts = extraction.extract_features(source, tiny_extractor(), str(tmp_path / "f"),
                                      num_shards=3, batch_size=4)
  info = extraction.merge_feature_sets(parts, str(tmp_path / "f" / "all"))
  assert info.num_rows == 30
  rejects = images.read_rejects(str(tmp_path / "f" / "all" / extraction.REJECTS_FILE))
  assert [(key, os.path.basename(path)) for key, path, _ in rejects] == [
      ("img/bad.jpg", "bad.jpg"), ("img/gone.png", "gone.png")]
  assert "No such file" in rejects[1][2] and rejects[0][2]
  keys = data.load_arrays(info, verification="all")["key"].astype(str)
  np.testing.assert_array_equal(keys, source.keys[:30])


def test_killed_extraction_resumes_without_redoing_finished_parts(tmp_path, manifest):
  source = images.read_manifest(manifest)
  extractor = tiny_extractor()
  whole = extraction.extract_features(source, extractor, str(tmp_path / "whole"),
                                      num_shards=3, batch_size=4)
  expected = data.load_arrays(
      extraction.merge_feature_sets(whole, str(tmp_path / "whole" / "all")), "all")
  out = str(tmp_path / "split")
  # Two machines finished parts 0 and 1; part 2 died before its metadata.
  extraction.extract_features(source, extractor, out, 3, shard_indices=[0, 1],
                              batch_size=4)
  extraction.extract_features(source, extractor, out, 3, shard_indices=[2],
                              batch_size=4)
  os.remove(os.path.join(extraction.part_directory(out, 2, 3), data.METADATA_FILE))
  finished = {i: os.stat(os.path.join(extraction.part_directory(out, i, 3),
                                      "features-00000.tfrecord")).st_mtime_ns
              for i in (0, 1)}
  parts = extraction.extract_features(source, extractor, out, 3, batch_size=4)
  for i, mtime in finished.items():
    assert os.stat(os.path.join(parts[i], "features-00000.tfrecord")).st_mtime_ns == mtime
  assert extraction.is_finished(parts[2])
  got = data.load_arrays(extraction.merge_feature_sets(parts, out + "/all"), "all")
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name])


@pytest.mark.slow
def test_extract_tool_runs_parts_then_merges(tmp_path, manifest):
  path = str(tmp_path / "fx.keras")
  tiny_extractor().save(path)
  run = lambda *flags: subprocess.run(
      [sys.executable, "-m", "tools.extract_features", f"--manifest={manifest}",
       f"--feature_extractor={path}", f"--out={tmp_path / 'o'}", "--num_shards=2",
       *flags], capture_output=True, text=True, timeout=300)
  first = run("--shard_index=0")
  assert first.returncode == 0, first.stderr[-2000:]
  assert not os.path.exists(tmp_path / "o" / "all")
  second = run("--shard_index=1")
  assert second.returncode == 0, second.stderr[-2000:]
  assert data.read_info(str(tmp_path / "o" / "all")).num_rows == 30
  refs = subprocess.run(
      [sys.executable, "-m", "tools.build_references", f"--features={tmp_path / 'o' / 'all'}",
       f"--out={tmp_path / 'refs.npz'}", "--num_references=4"],
      capture_output=True, text=True, timeout=300)
  assert refs.returncode == 0, refs.stderr[-2000:]
  assert references.ReferenceSets.load(tmp_path / "refs.npz").k == 4


# With a keep filter: the in-memory builder on the kept rows only.
@pytest.mark.parametrize("method,filtered", [("kmeans", False), ("random", False),
                                             ("kmeans", True)])
def test_streamed_references_equal_in_memory_ones(tmp_path, method, filtered):
  rng = np.random.default_rng(0)
  n, dim = 200, 6
  class_ids = np.minimum(rng.geometric(0.3, n) - 1, 4)  # class 4 small, skewed
  class_ids[class_ids == 3] = 0  # class 3 has no rows
  features = rng.normal(size=(n, dim)).astype(np.float32)
  info = data.write_features(str(tmp_path / "f"), [f"k{i}" for i in range(n)],
                             features, class_ids, np.full(n, -1),
                             [f"c{c}" for c in range(5)], rows_per_shard=50)
  keep = (lambda batch: batch["features"][:, 0] > 0) if filtered else None
  streamed = references.build_references_streamed(info, k=8, method=method, seed=3,
                                                  batch_size=32, keep=keep)
  build = {"kmeans": references.build_kmeans_references,
           "random": references.build_random_references}[method]
  kept = features[:, 0] > 0 if filtered else np.ones(n, bool)
  in_memory = build(features[kept], class_ids[kept], 5, k=8, seed=3)
  np.testing.assert_array_equal(streamed.counts, in_memory.counts)
  assert streamed.counts[3] == 0
  np.testing.assert_allclose(streamed.features, in_memory.features, rtol=1e-5, atol=1e-6)


def test_image_tools_fail_with_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "tools.train_classifier", f"--model_dir={tmp_path}"],
      capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "error: give exactly one of --manifest, --image_folder, --tfds (got none)")
