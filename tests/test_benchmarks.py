"""tools.benchmarks, the one command behind BENCHMARKS.md, and its Markdown sections."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from tools import markdown_sections

# Tiny settings for every stage: seconds each, not hours.
TINY = ["--demo_args=--steps=10 --eval_every=10",
        "--export_args=--feature_dim=8 --num_classes=3 --batch_sizes=1,4 --seconds=0.02 "
        "--repeats=1"]
TINY_CIFAR = ["--label_columns=worse_label", "--step1_epochs=2", "--cleannet_steps=4",
              "--finetune_steps=2",
              "--features_args=--batch_size=8 --num_references=2 --extract_batch_size=16 "
              "--verified_per_class=4",
              "--classification_args=--finetune_batch_size=8 --holdout_classes=2"]
OUTSIDE = "# Hand-written title\n\nProse outside the markers.\n"


def run_benchmarks(*flags):
  return subprocess.run([sys.executable, "-m", "tools.benchmarks", *flags],
                        capture_output=True, text=True, timeout=600)


def one_line_error(result):
  assert result.returncode != 0
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, result.stderr[-3000:]
  return lines[0]


def outside_sections(text):
  """The non-blank lines outside every generated section (markers included).

  New sections come with blank lines around them; nothing else may change.
  """
  kept, inside = [], False
  for line in text.splitlines(keepends=True):
    if line.startswith("<!-- ") and line.rstrip().endswith(":begin -->"):
      inside = True
    elif line.startswith("<!-- ") and line.rstrip().endswith(":end -->"):
      inside = False
    elif not inside and line.strip():
      kept.append(line)
  return "".join(kept)


@pytest.mark.parametrize("text,expected", [
    ("", "\n<!-- s:begin -->\nnew\n<!-- s:end -->\n"),
    ("intro", "intro\n\n<!-- s:begin -->\nnew\n<!-- s:end -->\n"),
    ("intro\n", "intro\n\n<!-- s:begin -->\nnew\n<!-- s:end -->\n"),
    ("a\n<!-- s:begin -->\nold\nlines\n<!-- s:end -->\nb\n",
     "a\n<!-- s:begin -->\nnew\n<!-- s:end -->\nb\n"),
    # Another section whose name starts the same is not this one.
    ("<!-- s-x:begin -->\nkeep\n<!-- s-x:end -->\n",
     "<!-- s-x:begin -->\nkeep\n<!-- s-x:end -->\n\n<!-- s:begin -->\nnew\n<!-- s:end -->\n"),
    # An end marker before the begin marker does not count.
    ("<!-- s:end -->\nx\n", "<!-- s:end -->\nx\n\n<!-- s:begin -->\nnew\n<!-- s:end -->\n"),
])
def test_replace_section(text, expected):
  assert markdown_sections.replace_section(text, "s", "new\n") == expected
  # A section without a final newline gets one: the end marker keeps its line.
  assert markdown_sections.replace_section(text, "s", "new") == expected
  assert markdown_sections.extract_section(expected, "s") == "new\n"


def test_replace_section_twice_is_idempotent_and_keeps_the_rest():
  text = "top\n<!-- a:begin -->\n1\n<!-- a:end -->\nmiddle\n<!-- b:begin -->\n2\n<!-- b:end -->\n"
  once = markdown_sections.replace_section(text, "b", "two\n")
  assert once == text.replace("\n2\n", "\ntwo\n")
  assert markdown_sections.replace_section(once, "b", "two\n") == once
  assert markdown_sections.extract_section(once, "a") == "1\n"
  assert markdown_sections.extract_section(once, "missing") is None


def test_update_file_creates_then_replaces(tmp_path):
  path = str(tmp_path / "B.md")
  markdown_sections.update_file(path, "s", "one\n")
  markdown_sections.update_file(path, "s", "two\n")
  with open(path, encoding="utf-8") as f:
    assert f.read() == "\n<!-- s:begin -->\ntwo\n<!-- s:end -->\n"
  assert os.listdir(tmp_path) == ["B.md"]  # no temporary file left


@pytest.mark.slow
def test_demo_and_export_stages_write_their_sections_and_resume(tmp_path):
  md, out = tmp_path / "BENCHMARKS.md", tmp_path / "out"
  md.write_text(OUTSIDE + "\n<!-- export:begin -->\nstale\n<!-- export:end -->\n\nEnd.\n",
                encoding="utf-8")
  before = outside_sections(md.read_text(encoding="utf-8"))
  flags = ["--stages=demo,export", f"--out={out}", f"--benchmarks_md={md}", "--seed=3",
           *TINY]
  first = run_benchmarks(*flags)
  assert first.returncode == 0, first.stderr[-3000:]
  text = md.read_text(encoding="utf-8")
  assert outside_sections(text) == before
  sections = {name: markdown_sections.extract_section(text, name)
              for name in ("header", "demo", "demo-paper", "export", "cost")}
  assert "python -m tools.benchmarks" in sections["header"]
  assert "--seed=3" in sections["header"]
  assert "`python -m tools.demo " in sections["demo"] and "seed 3" in sections["demo"]
  assert "| all classes | 1705 |" in sections["demo"]
  assert "--pseudo_label_margin=0.1" in sections["demo-paper"]
  assert "stale" not in sections["export"] and "| 4 |" in sections["export"]
  assert all(f"| {job} |" in sections["cost"] for job in ("demo", "demo-paper", "export"))
  # Sections come in the stages' order, header first; the hand-written text stays.
  assert text.startswith("<!-- header:begin -->")
  assert text.index("<!-- demo:end -->") < text.index("<!-- demo-paper:begin -->")
  for job in ("demo", "demo-paper", "export"):
    record = json.loads((out / f"{job}.json").read_text(encoding="utf-8"))
    assert record["seconds"] > 0 and record["peak_rss_mib"] > 50
    assert (out / f"{job}.log").exists()
  figures = {"demo.png", "export.png"}
  if os.path.exists(tmp_path / "docs" / "benchmarks"):  # with matplotlib
    assert set(os.listdir(tmp_path / "docs" / "benchmarks")) == figures
    assert "](docs/benchmarks/export.png)" in sections["export"]

  # A rerun skips the finished stages and writes the same sections.
  stamp = os.path.getmtime(out / "demo.json")
  again = run_benchmarks(*flags)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("skipped") == 3
  assert os.path.getmtime(out / "demo.json") == stamp
  assert md.read_text(encoding="utf-8") == text

  # A finished stage of another command is not silently reused.
  error = one_line_error(run_benchmarks(*flags[:-2], "--demo_args=--steps=11", TINY[1]))
  assert "demo.json" in error and "another command" in error


@pytest.mark.parametrize("flags,expected", [
    (["--stages=demo,bogus"], "error: --stages: unknown stage 'bogus'"),
    (["--stages=features"], "error: --data:"),
    (["--stages=demo", "--demo_args=--seed=2"], "error: --demo_args: --seed is set by"),
    (["--stages=demo", "--jobs=demo,nope"], "error: --jobs: no job 'nope' in this plan"),
    (["--stages=classification", "--data={data}", "--label_columns=aggre_label"],
     "error: --classification_label:"),
    (["--stages=demo", "--features_diagnostic=worse_label:clean_label"],
     "error: --features_diagnostic: 'worse_label:clean_label' is not LABEL:OTHER"),
    (["--stages=demo", "--features_diagnostic=aggre_label:worse_label",
      "--label_columns=aggre_label"],
     "error: --features_diagnostic: 'aggre_label:worse_label' needs both columns"),
])
def test_bad_input_is_one_line(tmp_path, flags, expected):
  flags = [flag.format(data=tmp_path) for flag in flags]
  assert one_line_error(run_benchmarks(*flags, f"--out={tmp_path / 'out'}",
                                       f"--benchmarks_md={tmp_path / 'B.md'}")
                        ).startswith(expected)


@pytest.mark.slow
def test_jobs_runs_only_the_named_jobs_of_the_stages(tmp_path):
  out = tmp_path / "out"
  result = run_benchmarks("--stages=demo", "--jobs=demo-paper", f"--out={out}",
                          f"--benchmarks_md={tmp_path / 'B.md'}", *TINY)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (out / "demo-paper.json").exists() and not (out / "demo.json").exists()


def test_failing_stage_names_its_log(tmp_path):
  out = tmp_path / "out"
  error = one_line_error(run_benchmarks("--stages=export", f"--out={out}",
                                        f"--benchmarks_md={tmp_path / 'B.md'}",
                                        "--export_args=--batch_sizes=x"))
  assert error == f"error: stage export failed (exit status 1); see {out / 'export.log'}"
  assert "batch_sizes" in (out / "export.log").read_text(encoding="utf-8")
  assert not (out / "export.json").exists()


def write_fake_cifar10n(folder, n_train=36, n_test=12, seed=0):
  """A CIFAR-10N-shaped folder: 3 classes of 32x32 PNGs told apart by brightness."""
  classes = ["cat", "dog", "ship"]
  rng = np.random.default_rng(seed)
  folder.mkdir()
  (folder / "classes.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")
  for split, n in [("train", n_train), ("test", n_test)]:
    lines = ["path,index,clean_label,aggre_label,worse_label" if split == "train"
             else "path,label"]
    for i in range(n):
      true = i % 3
      pixels = np.clip(rng.normal(40 + 85 * true, 15, (32, 32, 3)), 0, 255).astype(np.uint8)
      path = f"{split}/{classes[true]}/{i:04d}.png"
      (folder / split / classes[true]).mkdir(parents=True, exist_ok=True)
      (folder / path).write_bytes(tf.io.encode_png(pixels).numpy())
      if split == "train":
        worse = classes[(true + 1) % 3] if i % 4 == 3 else classes[true]
        aggre = classes[(true + 2) % 3] if i % 9 == 8 else classes[true]
        lines.append(f"{path},{i},{classes[true]},{aggre},{worse}")
      else:
        lines.append(f"{path},{classes[true]}")
    (folder / f"{split}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.slow
def test_cifar_stages_on_a_tiny_fake_cifar10n(tmp_path):
  data, md, out = tmp_path / "cifar10n", tmp_path / "BENCHMARKS.md", tmp_path / "out"
  write_fake_cifar10n(data)
  result = run_benchmarks("--stages=features,classification", f"--data={data}",
                          f"--out={out}", f"--benchmarks_md={md}", *TINY_CIFAR)
  assert result.returncode == 0, result.stderr[-3000:]
  text = md.read_text(encoding="utf-8")
  features = markdown_sections.extract_section(text, "features-worse_label")
  assert "`python -m tools.cifar10n_features " in features
  assert "25.00% of the 36 training images mislabeled" in features
  assert "| step 1: training, 2 epochs |" in features
  classification = markdown_sections.extract_section(text, "classification")
  assert "| noisy (step 1 only) | 1 |" in classification
  assert "| clean | 1 |" in classification
  assert "| ship | 12 |" in classification
  assert "| noisy | w_soft, mean 1 per class |" in classification
  assert "| noisy | w_soft, n classes unverified |" in classification
  assert "| noisy | w_soft, mean 1 per class, in the loss |" in classification
  # Weighted variants draw rows by weight unless their weights enter the loss.
  finetuned = out / "features-worse_label" / "classification"
  summaries = {name: json.loads((finetuned / f"finetune-{name}" / "summary.json")
                                .read_text(encoding="utf-8"))
               for name in ("w_soft", "w_soft_loss", "clean")}
  assert summaries["w_soft"]["config"]["sample_weighting"] == "sampling"
  assert 0 < summaries["w_soft"]["sampled_row_fraction"] <= 1
  assert summaries["w_soft_loss"]["config"]["sample_weighting"] == "loss"
  assert "sampled_row_fraction" not in summaries["w_soft_loss"]
  assert "mean_sample_weight" not in summaries["clean"]
  assert "CleanNet* " in classification and "CleanNet* (the paper" in classification
  scratch = markdown_sections.extract_section(text, "classification-scratch")
  assert "--from_scratch" in scratch and "trains from random weights" in scratch
  assert "| noisy (step 1 only) |" not in scratch and "| noisy | 1 |" in scratch
  assert "| noisy | w_soft, mean 1 per class |" in scratch
  assert "| noisy | w_soft, n classes unverified |" not in scratch
  assert "CleanNet* (the paper" in scratch
  result = json.loads((out / "features-worse_label" / "classification-scratch"
                       / "results.json").read_text(encoding="utf-8"))
  step1 = json.loads((out / "features-worse_label" / "step1" / "summary.json")
                     .read_text(encoding="utf-8"))
  # The unweighted variant is step 1; the others ran its recipe from random weights.
  assert result["top1"]["none"] == step1["test_top1"]
  assert result["finetune"]["steps"] == step1["steps"]
  assert not (out / "features-worse_label" / "classification-scratch" / "finetune-none").exists()
  if result["top1"]["clean"] != result["top1"]["none"]:
    assert "that each weighting recovers: w_hard (Eq. 13) " in scratch
    assert set(result["gap_recovered"]) == {"w_hard", "w_soft", "w_soft_balanced",
                                            "w_soft_loss", "w_soft_star"}
  cost = markdown_sections.extract_section(text, "cost")
  assert "| features-worse_label |" in cost and "| classification |" in cost
  assert "| classification-scratch |" in cost
  # Round 2: the job trained w_soft_star on CleanNet*'s weights; w_hard_star
  # (opt-in) is one more variant, and the first round's trainings, w_soft_star
  # and CleanNet* are reused, not trained again.
  assert "| noisy | w_soft of CleanNet* (round 2) |" in scratch
  work = out / "features-worse_label" / "classification-scratch"
  trained_before = {name: (work / f"finetune-{name}" / "summary.json").stat().st_mtime_ns
                    for name in ("w_soft", "w_soft_star")}
  round2 = [sys.executable, "-m", "tools.cifar10n_classification", f"--data={data}",
            f"--out={out / 'features-worse_label'}", "--from_scratch", "--cleannet_steps=4",
            "--finetune_batch_size=8"]
  result = subprocess.run([*round2, "--variants=none,w_soft,w_hard_star,w_soft_star,clean"],
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  result = json.loads((work / "results.json").read_text(encoding="utf-8"))
  assert {"w_hard_star", "w_soft_star"} <= set(result["top1"])
  assert result["weights"]["w_soft_star"]["correct_kept"] <= 1
  if result["top1"]["clean"] != result["top1"]["none"]:
    assert {"w_hard_star", "w_soft_star"} <= set(result["gap_recovered"])
  assert {name: (work / f"finetune-{name}" / "summary.json").stat().st_mtime_ns
          for name in trained_before} == trained_before
  star = np.load(work / "cleannet-star" / "weights.npz")
  hard_star = json.loads((work / "finetune-w_hard_star" / "summary.json")
                         .read_text(encoding="utf-8"))
  assert hard_star["mean_sample_weight"] == pytest.approx(star["w_hard"].mean())
  assert "| noisy | w_soft of CleanNet* (round 2) |" in (work / "results.md").read_text(
      encoding="utf-8")
  error = one_line_error(subprocess.run([*round2, "--variants=none,w_soft_star"],
                                        capture_output=True, text=True, timeout=600))
  assert error == ("error: --variants: w_soft_star needs w_soft (CleanNet* is trained on "
                   "the features of its classifier)")
  # Detection needs its features run; a stage list without it is refused.
  error = one_line_error(run_benchmarks("--stages=detection", f"--data={data}",
                                        f"--out={tmp_path / 'other'}",
                                        f"--benchmarks_md={md}", *TINY_CIFAR))
  assert "needs features-worse_label" in error


@pytest.mark.slow
def test_label_columns_share_step1_and_the_clean_variant(tmp_path):
  """The diagnostic reuses another column's step 1; the classification check its clean run."""
  data, md, out = tmp_path / "cifar10n", tmp_path / "BENCHMARKS.md", tmp_path / "out"
  write_fake_cifar10n(data)
  tiny = [flag for flag in TINY_CIFAR if not flag.startswith("--label_columns=")]
  result = run_benchmarks("--stages=features", f"--data={data}", f"--out={out}",
                          f"--benchmarks_md={md}", *tiny)
  assert result.returncode == 0, result.stderr[-3000:]
  text = md.read_text(encoding="utf-8")
  names = ["features-worse_label", "features-aggre_label",
           "features-worse_label-step1_aggre_label"]
  assert [text.index(f"<!-- {name}:begin -->") for name in names] == sorted(
      text.index(f"<!-- {name}:begin -->") for name in names)
  section = markdown_sections.extract_section(text, names[2])
  step1 = out / "features-aggre_label" / "step1"
  assert f"--label_column=worse_label" in section and f"--step1_from={step1}" in section
  assert "25.00% of the 36 training images mislabeled" in section
  assert f"Step 1 is not trained on them: the small ResNet of `{step1}`" in section
  assert f"| step 1: reused from `{step1}`, test top-1 measured again |" in section
  # The same network on the same test images: the same top-1 as where it was trained.
  results = [json.loads((out / f"{name}.json").read_text(encoding="utf-8"))["result"]
             for name in names]
  assert results[2]["step1_test_top1"] == results[1]["step1_test_top1"]
  assert results[2]["step1_from"] == str(step1) and results[1]["step1_from"] is None
  # worse_label's labels and verification rows, aggre_label's network's features.
  manifests = [(out / name / "train.csv").read_text(encoding="utf-8") for name in names]
  assert manifests[2] == manifests[0] != manifests[1]
  features = [np.load(out / name / "references.npz")["features"] for name in names]
  assert not np.allclose(features[2], features[0])
  # The check on aggre_label copies worse_label's from-scratch clean run (same
  # recipe, same images, same clean labels) instead of training it again.
  result = run_benchmarks("--stages=classification",
                          "--jobs=classification-scratch,classification-scratch-aggre_label",
                          f"--data={data}", f"--out={out}", f"--benchmarks_md={md}", *tiny)
  assert result.returncode == 0, result.stderr[-3000:]
  check = json.loads((out / "classification-scratch-aggre_label.json")
                     .read_text(encoding="utf-8"))
  assert f"--clean_from={out / 'features-worse_label'}" in check["command"]
  trained = out / "features-worse_label" / "classification-scratch" / "finetune-clean"
  copied = json.loads((out / "features-aggre_label" / "classification-scratch"
                       / "finetune-clean" / "summary.json").read_text(encoding="utf-8"))
  assert copied["reused_from"] == str(trained)
  top1 = [json.loads((out / f"features-{label}" / "classification-scratch" / "results.json")
                     .read_text(encoding="utf-8"))["top1"]
          for label in ("worse_label", "aggre_label")]
  assert top1[1]["clean"] == top1[0]["clean"]
  assert set(top1[1]) == {"none", "w_hard", "w_soft", "w_soft_loss", "clean"}
  # A clean run that is not this run's training is refused, by name.
  diagnostic = out / "features-worse_label-step1_aggre_label"
  classify = [sys.executable, "-m", "tools.cifar10n_classification", f"--data={data}",
              f"--out={diagnostic}", "--cleannet_steps=4", "--finetune_batch_size=8",
              "--variants=none,clean"]
  fake = tmp_path / "fake"
  (fake / "classification-scratch" / "finetune-clean").mkdir(parents=True)
  summary = json.loads((trained / "summary.json").read_text(encoding="utf-8"))
  for clean_from, recipe, rows, expected in [
      (out / "features-worse_label", None, None,
       "--clean_from: needs --from_scratch (a fine-tuned clean variant starts from its own "
       "run's step 1)"),
      (tmp_path / "nowhere", None, None,
       f"--clean_from: {tmp_path / 'nowhere' / 'classification-scratch' / 'finetune-clean'}"
       "/summary.json: missing; run this tool with --from_scratch and the clean variant on "
       f"--out={tmp_path / 'nowhere'} first"),
      (fake, {**summary["config"], "steps": summary["config"]["steps"] + 1}, None,
       f"--clean_from: {fake / 'classification-scratch' / 'finetune-clean'} was trained "
       "with another recipe than this run's step 1"),
      (fake, summary["config"], 35,
       f"--clean_from: {fake}/train.csv lists other training images than this run's")]:
    (fake / "classification-scratch" / "finetune-clean" / "summary.json").write_text(
        json.dumps({**summary, "config": recipe}), encoding="utf-8")
    if rows:
      lines = (out / "features-worse_label" / "train.csv").read_text(
          encoding="utf-8").splitlines()
      (fake / "train.csv").write_text("\n".join(lines[:rows + 1]) + "\n", encoding="utf-8")
    scratch = [] if expected.startswith("--clean_from: needs") else ["--from_scratch"]
    error = one_line_error(subprocess.run([*classify, *scratch, f"--clean_from={clean_from}"],
                                          capture_output=True, text=True, timeout=600))
    assert error == "error: " + expected
  assert not (diagnostic / "classification-scratch" / "finetune-clean").exists()
  # Without aggre_label among the columns the default pair is left out.
  assert "step1_aggre_label" not in subprocess.run(
      [sys.executable, "-c", "import sys; from absl import flags; from tools import benchmarks; "
       "flags.FLAGS(['x', '--data=d', '--label_columns=worse_label']); "
       "print([job.name for job in benchmarks.plan('o', 'd')])"],
      capture_output=True, text=True, check=True).stdout


def assert_passes_in_a_fresh_process(check):
  """Runs the Python statements `check`, which must exit 0.

  In a subprocess: tools.benchmarks' flags clash with other tools' in one process.
  """
  result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stderr[-2000:]


def test_gap_recovered_is_each_weightings_share_of_the_noisy_to_clean_gap():
  assert_passes_in_a_fresh_process(textwrap.dedent("""
      import pytest
      from tools.cifar10n_classification import gap_recovered
      top1 = {"none": 0.60, "w_hard": 0.66, "w_soft": 0.70, "clean": 0.80, "step1": 0.5}
      assert gap_recovered(top1) == pytest.approx({"w_hard": 0.3, "w_soft": 0.5})
      assert gap_recovered({**top1, "clean": 0.60}) == {}
      assert gap_recovered({"w_soft": 0.7, "clean": 0.8}) == {}
      """))


def test_paper_demo_args_are_the_papers_settings():
  check = ("from tools import benchmarks; from cleannet_tf import training; "
           "given = dict(a.removeprefix('--').split('=') for a in benchmarks.PAPER_DEMO_ARGS); "
           "parse = lambda v, like: v == 'true' if isinstance(like, bool) else type(like)(v); "
           "paper = training.PAPER_SETTINGS; "
           "assert given.keys() == paper.keys(), given; "
           "assert {k: parse(v, paper[k]) for k, v in given.items()} == paper, given")
  assert_passes_in_a_fresh_process(check)


def test_cost_total_says_when_it_leaves_out_earlier_runs():
  check = (
      "from tools import benchmarks; "
      "jobs = [benchmarks.Job(n, n, 'm', [], n) for n in ('a', 'b')]; "
      "record = lambda resumed: {'seconds': 60.0, 'peak_rss_mib': 1.0, 'machine': 'x', "
      "'resumed': resumed}; "
      "fresh = benchmarks.cost_markdown(jobs, {'a': record(False), 'b': record(False)}); "
      "assert '| all | 2.0 min |' in fresh, fresh; "
      "mixed = benchmarks.cost_markdown(jobs, {'a': record(False), 'b': record(True)}); "
      "assert '| b (resumed: work finished earlier not timed) |' in mixed, mixed; "
      "assert '| all (resumed stages: their last run only) | 2.0 min |' in mixed, mixed")
  assert_passes_in_a_fresh_process(check)


def test_features_section_gives_no_rate_for_a_step1_resumed_from_a_checkpoint():
  """A step 1 that an earlier run began: its time is the rest only, so no rate."""
  assert_passes_in_a_fresh_process(textwrap.dedent("""
      from absl import flags
      from tools import benchmarks
      flags.FLAGS(['x', '--data=d'])
      job = {job.name: job for job in benchmarks.plan('o', 'd')}['features-worse_label']
      assert job.started_parts == (('step 1', 'o/features-worse_label/step1/checkpoints'),)
      result = {'feature_rows': 50000, 'noise_rate': 0.4, 'step1_test_top1': 0.75,
                'dim': 128, 'features': 'f', 'references': 'missing.npz',
                'step1_seconds': 100.0, 'extraction_seconds': 10.0,
                'references_seconds_per_class': 1.0}
      whole = benchmarks.features_markdown(job, dict(result, finished_before=[],
                                                     started_before=[]), 20)
      assert '| step 1: training, 20 epochs | 100 s | 10,000 images/s |' in whole, whole
      resumed = benchmarks.features_markdown(job, dict(result, finished_before=[],
                                                       started_before=['step 1']), 20)
      note = "resumed from an earlier run's checkpoint (not timed)"
      assert f'| step 1: training, 20 epochs | {note} | {note} |' in resumed, resumed
      assert '| feature extraction, 50,000 images | 10.0 s | 5,000 images/s |' in resumed
      """))


def test_seeded_ablation_jobs_follow_each_detection_job():
  assert_passes_in_a_fresh_process(
      "from absl import flags; from tools import benchmarks\n"
      "flags.FLAGS(['x', '--data=d', '--features_diagnostic=', '--seeded_ablations=dropout',"
      " '--ablation_seeds=3'])\n"
      "jobs = {job.name: job for job in benchmarks.plan('o', 'd')}\n"
      "names = list(jobs)\n"
      "assert names.index('ablation-seeds-worse_label') == "
      "names.index('detection-worse_label') + 1, names\n"
      "args = jobs['ablation-seeds-aggre_label'].args\n"
      "for arg in ['--ablations=dropout', '--ablation_seeds=3', '--cleannet_repeats=3',"
      " '--transfer_n=0', '--section=ablation-seeds-aggre_label', '--out=o/ablation-seeds-aggre_label',"
      " '--run_dir=o/features-aggre_label']:\n"
      "  assert arg in args, (arg, args)\n"
      "flags.FLAGS(['x', '--data=d', '--seeded_ablations='])\n"
      "assert not [job for job in benchmarks.plan('o', 'd') if job.name.startswith('ablation')]\n")


def test_classification_check_jobs_repeat_the_scratch_variants_on_other_labels():
  assert_passes_in_a_fresh_process(textwrap.dedent("""
      import pytest
      from absl import flags
      from tools import benchmarks
      from cleannet_tf.errors import InputError
      flags.FLAGS(['x', '--data=d'])
      jobs = {job.name: job for job in benchmarks.plan('o', 'd')}
      names = list(jobs)
      assert names[-3:] == ['classification', 'classification-scratch',
                            'classification-scratch-aggre_label'], names
      check = jobs['classification-scratch-aggre_label']
      for arg in ['--out=o/features-aggre_label', '--from_scratch',
                  '--variants=none,w_hard,w_soft,w_soft_loss,clean',
                  '--clean_from=o/features-worse_label',
                  '--benchmarks_md=o/sections/classification-scratch-aggre_label.md']:
        assert arg in check.args, (arg, check.args)
      assert check.output_dir == 'o/features-aggre_label/classification-scratch'
      assert check.sections == ('classification-scratch',)
      assert check.needs == ('features-aggre_label', 'classification-scratch')
      # A default column outside --label_columns is skipped; a given one refused.
      flags.FLAGS(['x', '--data=d', '--label_columns=worse_label'])
      assert 'classification-scratch-aggre_label' not in [
          job.name for job in benchmarks.plan('o', 'd')]
      flags.FLAGS(['x', '--data=d', '--label_columns=worse_label',
                   '--classification_checks=aggre_label'])
      with pytest.raises(InputError, match="must be in --label_columns"):
        benchmarks.plan('o', 'd')
      flags.FLAGS(['x', '--data=d', '--classification_checks=worse_label'])
      with pytest.raises(InputError, match="not --classification_label"):
        benchmarks.plan('o', 'd')
      """))
