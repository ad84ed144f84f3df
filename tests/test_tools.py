"""The absl binaries: help, one-line errors, and a convert -> train -> score run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cleannet_tf import data

CLASSES = ["cat", "dog", "fish"]


def run_tool(module, *flags):
  return subprocess.run([sys.executable, "-m", f"tools.{module}", *flags],
                        capture_output=True, text=True, timeout=600)


def one_line_error(result):
  """The tool failed with a single 'error: ...' line and no traceback."""
  assert result.returncode != 0
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, result.stderr[-3000:]
  return lines[0]


def write_tsv(path, n=60, dim=4, seed=0):
  rng = np.random.default_rng(seed)
  true = rng.integers(0, 3, n)
  noisy = np.where(rng.random(n) < 0.2, (true + 1) % 3, true)
  features = np.abs(np.eye(3, dim)[true] * 3 + rng.normal(scale=0.3, size=(n, dim)))
  verification = np.where(rng.random(n) < 0.5, (noisy == true).astype(int), -1)
  with open(path, "w", encoding="utf-8") as out:
    for i in range(n):
      out.write(f"img{i}\t{CLASSES[noisy[i]]}\t{verification[i]}\t"
                + ",".join(f"{x:.4f}" for x in features[i]) + "\n")


@pytest.mark.parametrize("module", ["train_cleannet", "score", "convert_features", "demo"])
def test_helpfull_documents_the_flags(module):
  result = run_tool(module, "--helpfull")  # absl prints the help, then exits 1
  assert "Traceback" not in result.stderr
  for flag in {"train_cleannet": ["--train_features", "--steps", "--negative_weight",
                                  "--negative_neighbors", "--pseudo_label_quantile",
                                  "--strategy"],
               "score": ["--model", "--features", "--output_dir"],
               "convert_features": ["--tsv", "--class_names", "--rejects"],
               "demo": ["--work_dir", "--steps"]}[module]:
    assert flag in result.stdout


def test_convert_names_file_and_line_of_bad_input(tmp_path):
  # Every kind of bad line is test_data's; here, that the tool prints it as one line.
  (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
  (tmp_path / "bad.tsv").write_text("img0\tcat\t1\t1,2,3,4\nimg9\tcow\t1\t1,2,3,4\n")
  result = run_tool("convert_features", f"--tsv={tmp_path / 'bad.tsv'}",
                    f"--class_names={tmp_path / 'classes.txt'}",
                    f"--output_dir={tmp_path / 'out'}")
  assert one_line_error(result) == f"error: {tmp_path / 'bad.tsv'}:2: unknown class name 'cow'"


def test_convert_of_an_empty_file_is_a_one_line_error(tmp_path):
  (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
  (tmp_path / "empty.tsv").write_text("")
  result = run_tool("convert_features", f"--tsv={tmp_path / 'empty.tsv'}",
                    f"--class_names={tmp_path / 'classes.txt'}",
                    f"--output_dir={tmp_path / 'out'}")
  assert "empty.tsv" in one_line_error(result)


def test_train_without_verified_rows_is_a_one_line_error(tmp_path):
  data.write_features(str(tmp_path / "feats"), np.array(["a", "b"]),
                      np.ones((2, 4), np.float32), np.array([0, 1]), np.array([-1, -1]),
                      CLASSES)
  result = run_tool("train_cleannet", f"--train_features={tmp_path / 'feats'}",
                    f"--model_dir={tmp_path / 'model'}", "--num_references=2")
  assert "no verified rows" in one_line_error(result)


def test_bad_flag_is_a_short_error(tmp_path):
  result = run_tool("train_cleannet", f"--train_features={tmp_path}", "--model_dir=m",
                    "--batch_size=0")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "--batch_size must be positive" in result.stderr


@pytest.mark.slow
def test_convert_train_score_end_to_end(tmp_path):
  (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
  write_tsv(tmp_path / "train.tsv")
  result = run_tool("convert_features", f"--tsv={tmp_path / 'train.tsv'}",
                    f"--class_names={tmp_path / 'classes.txt'}",
                    f"--output_dir={tmp_path / 'feats'}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout)["rows"] == 60
  small = ["--num_references=4", "--query_hidden_dim=8", "--embedding_dim=4",
           "--reference_hidden_dims=8,8", "--attention_dim=4", "--batch_size=8",
           "--eval_every=5", "--checkpoint_every=5", "--log_every=5"]
  train = ["train_cleannet", f"--train_features={tmp_path / 'feats'}",
           f"--model_dir={tmp_path / 'model'}", *small]
  result = run_tool(*train, "--steps=10")
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.path.exists(tmp_path / "model" / "references.npz")
  result = run_tool(*train, "--steps=15")  # resumes from step 10
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resumed from" in result.stderr
  result = run_tool("score", f"--model={tmp_path / 'model' / 'model.keras'}",
                    f"--features={tmp_path / 'feats'}", f"--output_dir={tmp_path / 'scores'}")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout)
  assert report["rows"] == 60 and "verified_rows" in report


@pytest.mark.slow
def test_benchmark_training_times_the_loop_against_one_call_a_step(tmp_path):
  write_tsv(tmp_path / "train.tsv")
  data.convert_tsv([tmp_path / "train.tsv"], CLASSES, tmp_path / "feats")
  result = run_tool("benchmark_training", f"--train_features={tmp_path / 'feats'}",
                    f"--work_dir={tmp_path / 'work'}", "--num_references=4",
                    "--batch_size=8", "--timed_steps=6", "--steps_per_call=3", "--rounds=1")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout[result.stdout.index("{"):])
  assert set(report["results"]) == {"one_call_per_step_no_xla", "looped_no_xla", "looped"}
  assert report["results"]["one_call_per_step_no_xla"]["ratio"] == 1.0
  assert all(r["steps_per_second"] > 0 for r in report["results"].values())
  assert "x the reference" in result.stdout
