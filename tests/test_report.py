"""The review report: its pages, verify_next.csv, thumbnails and the tool."""

import csv
import html
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from cleannet_tf import data, report, scoring
from cleannet_tf import model as model_lib
from cleannet_tf.errors import InputError

CLASSES = ("cat", "dog", "fish")
NUM_ROWS, DIM, K = 40, 5, 3


def build_scored_set(directory, with_images=True):
  """A tiny scored data set: 3 classes, 40 rows, PNG images and a manifest.

  Only class 0 ("cat") has verification labels. The lowest-scored row's image
  is missing and the highest-scored row's image is not an image, so both must
  become placeholders.

  Returns:
    dict with model, info, score_paths, manifest, scores (the score TSV rows
    as arrays: key, class_id, verification, score) and the missing keys.
  """
  keras.utils.set_random_seed(0)
  model = model_lib.CleanNet(len(CLASSES), K, DIM, query_hidden_dim=8, embedding_dim=4,
                             reference_hidden_dims=(8, 6), attention_dim=4)
  rng = np.random.default_rng(0)
  model.reference_features.assign(rng.random((len(CLASSES), K, DIM)).astype("float32"))
  model.reference_counts.assign(np.array([3, 2, 3], "int32"))
  keys = np.array([f"img/{i:02d}.png" for i in range(NUM_ROWS)])
  features = rng.random((NUM_ROWS, DIM)).astype(np.float32)
  class_ids = np.arange(NUM_ROWS) % len(CLASSES)
  verification = np.where(class_ids == 0, rng.integers(0, 2, NUM_ROWS), -1)
  info = data.write_features(str(directory / "features"), keys, features, class_ids,
                             verification, CLASSES, rows_per_shard=15)
  scores = scoring.Scorer(model).score(features, class_ids)
  model.delta.assign(float(np.median(scores)))
  # Dog and fish have no verification labels: their thresholds move.
  scoring.set_class_score_quartiles(model, info, [1, 0, 0])
  summary = scoring.score_feature_set(model, info, str(directory / "scores"))
  result = {"model": model, "info": info, "score_paths": summary.outputs, "manifest": None,
            "scores": {"key": keys, "class_id": class_ids, "verification": verification,
                       "score": scores, "features": features}}
  if with_images:
    lowest, highest = keys[np.argmin(scores)], keys[np.argmax(scores)]
    os.makedirs(directory / "images" / "img")
    for i, key in enumerate(keys):
      if key == highest:
        (directory / "images" / key).write_bytes(b"not an image")
      elif key != lowest:
        pixels = np.zeros((12, 16, 3), np.uint8) + np.array([20 * i % 256, 80 * (i % 3), 150],
                                                            np.uint8)
        pixels[3:9, 4:12] = 255 - pixels[3:9, 4:12]
        tf.io.write_file(str(directory / "images" / key), tf.io.encode_png(pixels))
    manifest = directory / "images" / "manifest.csv"
    manifest.write_text("key,path\n" + "".join(f"{key},{key}\n" for key in keys))
    result.update(manifest=str(manifest), missing=lowest, corrupt=highest)
  return result


def read_pages(folder):
  return {name: open(os.path.join(folder, name), encoding="utf-8").read()
          for name in os.listdir(folder) if name.endswith(".html")}


def section_keys(page, title):
  """Keys shown in the section whose heading starts with `title`, in order."""
  section = page.split(f"<h2>{title}", 1)[1].split("<h2>", 1)[0]
  return [html.unescape(key) for key in re.findall(r'class="key">(.*?)</span>', section)]


def read_csv(path):
  with open(path, encoding="utf-8", newline="") as f:
    return list(csv.reader(f))


@pytest.fixture(name="scored")
def fixture_scored(tmp_path):
  return build_scored_set(tmp_path)


def write(scored, out_dir, **kwargs):
  return report.write_report(scored["model"], scored["info"], scored["score_paths"],
                             str(out_dir), manifest=scored["manifest"], **kwargs)


def test_pages_show_every_class_with_delta_and_the_extreme_scores(scored, tmp_path):
  summary = write(scored, tmp_path / "review", per_class=4)
  pages = read_pages(tmp_path / "review")
  assert summary["rows"] == NUM_ROWS and summary["classes"] == len(CLASSES)
  scores = scored["scores"]
  thresholds = scoring.class_thresholds(scored["model"])
  assert thresholds[0] == summary["delta"] and (thresholds[1:] != summary["delta"]).all()
  for class_id, name in enumerate(CLASSES):
    page = pages[f"class-{class_id:05d}.html"]
    assert f"<h1>{name}</h1>" in page and f'href="class-{class_id:05d}.html"' in pages["index.html"]
    assert re.search(r'<svg[^>]*aria-label="score histogram, delta '
                     f'{thresholds[class_id]:.3f}".*class="delta"', page)
    assert ("moved to" in page) == (class_id > 0)
    members = scores["class_id"] == class_id
    order = np.argsort(scores["score"][members], kind="stable")
    keys = scores["key"][members]
    assert section_keys(page, "Suspects") == keys[order[:4]].tolist()
    assert section_keys(page, "Highest") == keys[order[::-1][:4]].tolist()
  # Classes are listed by estimated noise (share below delta), highest first.
  noise = [np.mean(scores["score"][scores["class_id"] == c] < thresholds[c]) for c in range(3)]
  listed = re.findall(r'<tr id="class-(\d+)">', pages["index.html"])
  assert [noise[int(c)] for c in listed] == sorted(noise, reverse=True)
  assert pages["index.html"].count('class="tag"') == 1  # only "cat" is verified


def test_references_show_their_nearest_class_member(scored, tmp_path):
  model, scores = scored["model"], scored["scores"]
  keys, _ = report.nearest_members(model, scored["info"], max_batch=7)  # several batches
  centroids, counts = model.reference_features.numpy(), model.reference_counts.numpy()
  for c in range(len(CLASSES)):
    members = scores["class_id"] == c
    distance = ((scores["features"][members][:, None] - centroids[c][None]) ** 2).sum(-1)
    expected = scores["key"][members][distance.argmin(axis=0)]
    assert keys[c, :counts[c]].tolist() == expected[:counts[c]].tolist()
    assert keys[c, counts[c]:].tolist() == [""] * (K - counts[c])
  write(scored, tmp_path / "review", references_shown=1)
  page = read_pages(tmp_path / "review")["class-00001.html"]
  shown = section_keys(page, "References with the most") + section_keys(
      page, "References with the least")
  assert sorted(shown) == sorted(keys[1, :2].tolist())  # 2 references, 1 each way


def test_verify_next_csv_is_a_ranked_manifest_within_budget(scored, tmp_path):
  write(scored, tmp_path / "review", verify_budget=7)
  rows = read_csv(tmp_path / "review" / "verify_next.csv")
  assert tuple(rows[0]) == report.VERIFY_COLUMNS == ("key", "path", "label", "verification")
  rows = rows[1:]
  assert len(rows) == 7
  scores, thresholds = scored["scores"], scoring.class_thresholds(scored["model"])
  index = {key: i for i, key in enumerate(scores["key"])}
  picked = np.array([index[row[0]] for row in rows])
  assert all(row[3] == "" for row in rows)
  assert (scores["verification"][picked] == -1).all()
  assert [row[2] for row in rows] == [CLASSES[c] for c in scores["class_id"][picked]]
  assert all(os.path.isfile(row[1]) or row[0] == scored["missing"] for row in rows)
  # Unverified classes (dog, fish) first, round-robin: 2 classes per round.
  classes = scores["class_id"][picked]
  assert 0 not in classes  # "cat" is verified and there are enough other rows
  assert all(set(classes[i:i + 2]) == {1, 2} for i in range(0, 6, 2))
  for c in (1, 2):
    distance = np.abs(scores["score"][picked[classes == c]] - thresholds[c])
    members = (scores["class_id"] == c) & (scores["verification"] == -1)
    nearest = np.sort(np.abs(scores["score"][members] - thresholds[c]))[:len(distance)]
    np.testing.assert_allclose(distance, nearest)
  write(scored, tmp_path / "all", verify_budget=1000)
  rows = read_csv(tmp_path / "all" / "verify_next.csv")[1:]
  assert len(rows) == int((scores["verification"] == -1).sum())


def test_thumbnails_exist_and_unreadable_images_get_placeholders(scored, tmp_path):
  summary = write(scored, tmp_path / "review")
  folder = tmp_path / "review"
  pages = read_pages(folder)
  sources = {src for page in pages.values() for src in re.findall(r'<img src="([^"]+)"', page)}
  assert sources and summary["thumbnails"] == len(sources)
  for src in sources:
    assert src.startswith("thumbs/")
    image = tf.io.decode_jpeg(tf.io.read_file(str(folder / src)))
    assert max(image.shape[:2]) == report.THUMBNAIL_SIZE
  unreadable = read_csv(folder / "unreadable.csv")
  assert unreadable[0] == list(report.UNREADABLE_COLUMNS)
  assert {row[0] for row in unreadable[1:]} == {scored["missing"], scored["corrupt"]}
  assert summary["unreadable"] == 2
  scores = scored["scores"]
  missing = int(np.argmin(scores["score"]))  # the lowest score: the class's first suspect
  page = pages[f"class-{scores['class_id'][missing]:05d}.html"]
  first = page.split("<h2>Suspects", 1)[1].split("</figure>", 1)[0]
  assert 'class="placeholder"' in first and scored["missing"] in first
  assert "Unreadable images (2" in pages["index.html"]


def test_report_is_self_contained(scored, tmp_path):
  write(scored, tmp_path / "review")
  for name, page in read_pages(tmp_path / "review").items():
    assert "http://" not in page and "https://" not in page, name
    assert "<script" not in page and "<link" not in page, name
    for target in re.findall(r'(?:src|href)="([^"#]+)"', page):
      assert os.path.isfile(tmp_path / "review" / target), (name, target)


def test_without_manifest_only_keys_and_scores(tmp_path):
  scored = build_scored_set(tmp_path, with_images=False)
  summary = write(scored, tmp_path / "review", per_class=2)
  pages = read_pages(tmp_path / "review")
  assert summary["thumbnails"] == summary["unreadable"] == 0
  assert not any("<img" in page for page in pages.values())
  assert len(section_keys(pages["class-00002.html"], "Suspects")) == 2
  rows = read_csv(tmp_path / "review" / "verify_next.csv")[1:]
  assert rows and all(row[1] == "" for row in rows)


def test_truth_gives_the_measured_noise_rate(scored, tmp_path):
  keys, class_ids = scored["scores"]["key"], scored["scores"]["class_id"]
  clean = np.where(np.arange(NUM_ROWS) % 4 == 0, (class_ids + 1) % 3, class_ids)
  truth = tmp_path / "truth.csv"
  truth.write_text("key,clean_label\n" + "".join(
      f"{key},{CLASSES[c] if i % 2 else c}\n" for i, (key, c) in enumerate(zip(keys, clean))))
  write(scored, tmp_path / "review", truth=str(truth))
  index = read_pages(tmp_path / "review")["index.html"]
  assert "measured (clean labels)" in index
  for c in range(3):
    row = index.split(f'<tr id="class-{c}">', 1)[1].split("</tr>", 1)[0]
    measured = np.mean(clean[class_ids == c] != c)
    assert f"{100 * measured:.1f}%" in row
  truth.write_text("key,clean_label\nimg/00.png,bird\n")
  with pytest.raises(InputError, match=r"truth.csv:2: clean label 'bird'"):
    write(scored, tmp_path / "review", truth=str(truth))


def test_rewrite_replaces_the_folder_and_leaves_no_temporaries(scored, tmp_path):
  write(scored, tmp_path / "review", verify_budget=3)
  (tmp_path / "review" / "stale.txt").write_text("old")
  write(scored, tmp_path / "review", verify_budget=5)
  assert not (tmp_path / "review" / "stale.txt").exists()
  assert len(read_csv(tmp_path / "review" / "verify_next.csv")) == 6
  assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]


def test_malformed_scores_name_the_file_and_line(scored, tmp_path):
  bad = tmp_path / "scores-bad.tsv"
  lines = open(scored["score_paths"][0], encoding="utf-8").read().splitlines()
  fields = lines[3].split("\t")
  fields[scoring.SCORE_COLUMNS.index("score")] = "0.1x"
  lines[3] = "\t".join(fields)
  bad.write_text("\n".join(lines) + "\n")
  with pytest.raises(InputError, match=r"scores-bad.tsv:4: score '0.1x' is not a number"):
    report.write_report(scored["model"], scored["info"], [str(bad)], str(tmp_path / "r"))
  assert not (tmp_path / "r").exists()


def test_tool_writes_the_report_and_fails_in_one_line(scored, tmp_path):
  scored["model"].save(str(tmp_path / "model.keras"))
  command = [sys.executable, "-m", "tools.review_report", f"--model={tmp_path / 'model.keras'}",
             f"--features={scored['info'].directory}",
             f"--scores_dir={os.path.dirname(scored['score_paths'][0])}",
             f"--manifest={scored['manifest']}", f"--output_dir={tmp_path / 'review'}",
             "--verify_budget=4"]
  result = subprocess.run(command, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
  assert '"verify_next": 4' in result.stdout
  assert os.path.isfile(tmp_path / "review" / "index.html")
  command[5] = f"--scores_dir={tmp_path}"
  result = subprocess.run(command, capture_output=True, text=True)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "no scores-*.tsv" in last
  assert "Traceback" not in result.stderr


def test_truth_lookup_finds_every_key_of_a_large_unsorted_file(tmp_path):
  # NumPy's StringDType searchsorted misplaces keys in arrays like this one
  # (paths of two classes, interleaved): every key must still be found.
  keys = [f"/data/{name}/{i:04d}.jpg" for i in range(60) for name in ("frog", "airplane")]
  labels = ["frog" if "frog" in key else "ship" for key in keys]
  (tmp_path / "truth.csv").write_text(
      "key,clean_label\n" + "".join(f"{k},{l}\n" for k, l in zip(keys, labels)))
  truth = report._Truth.read(str(tmp_path / "truth.csv"), ["frog", "ship"], "clean_label")
  found = truth.lookup(np.array(keys[::-1], dtype=report._STR))
  np.testing.assert_array_equal(found, [0 if l == "frog" else 1 for l in labels[::-1]])
