"""CIFAR-10N top-1 with CleanNet's sample weights (Table 3's comparison).

  python -m tools.cifar10n_features --data=/path/to/cifar10n --out=runs/cifar10n
  python -m tools.cifar10n_classification --data=/path/to/cifar10n --out=runs/cifar10n

Starting from the step-1 classifier, CIFAR-10N features and reference sets
that tools.cifar10n_features left in --out, this trains CleanNet (step 2),
scores every training image (step 3's weights), then fine-tunes the step-1
classifier once per variant with the same budget (--finetune_steps at
--finetune_learning_rate, same seed) or, with --from_scratch,
trains each variant from random weights with step 1's own recipe (its steps,
batch, learning rate and seed: the unweighted variant is step 1 itself):

* none: noisy labels, all weights 1 (more step-1 training);
* w_hard / w_soft: noisy labels weighted by CleanNet (Eq. 12-14);
* w_soft_balanced: w_soft rescaled to a mean of 1 in every noisy class
  (``detection.balance_per_class``);
* w_soft_holdout: w_soft of a CleanNet trained without the verification
  labels of --holdout_classes classes (the Fig. 6 analog);
* w_hard_loss, w_soft_loss, w_soft_balanced_loss: the same weights entering
  training as loss weights (``sample_weighting="loss"``, Eq. 14 literally)
  instead of the library's default, rows drawn with probability w / max(w);
* w_hard_star, w_soft_star: the alternating scheme's second round (Sec. 3.3):
  the weights of CleanNet*, the CleanNet trained again on the features of the
  w_soft variant's classifier (needs w_soft; not in the default --variants:
  each costs a training on top of CleanNet*);
* clean: the true CIFAR-10 labels, weights 1 (the upper bound). With
  --from_scratch and --clean_from, another feature run's clean variant is
  reused: the clean labels do not depend on the noisy column, so on the same
  images with the same step-1 recipe it is the same training.

--variants chooses among them. Each variant's test top-1, and the share of
the noisy-to-clean gap that each weighting recovers, are written to
<out>/classification/results.json and results.md (<out>/classification-scratch
with --from_scratch), and as a bar chart to top1.png there (with matplotlib);
with --benchmarks_md, the file's section between its ``classification`` (or
``classification-scratch``) markers is regenerated. Every stage resumes or is
skipped when a previous run finished it.
"""

import csv
import dataclasses
import json
import os
import shlex
import sys
import textwrap

from absl import flags
import numpy as np

from tools import common, markdown_sections
from tools import prepare_cifar10n  # pylint: disable=unused-import (its flags)
from cleannet_tf import (alternating, classifier, data, detection, images, training)
from cleannet_tf.errors import InputError

VARIANTS = ("none", "w_hard", "w_soft", "w_soft_balanced", "w_soft_holdout", "w_hard_loss",
            "w_soft_loss", "w_soft_balanced_loss", "w_hard_star", "w_soft_star", "clean")
# Variants whose weights enter the loss rather than the drawing of rows.
LOSS_SUFFIX = "_loss"
# Variants weighted by CleanNet* (round 2), which is trained on the features of
# the w_soft variant's classifier.
STAR_SUFFIX = "_star"
DEFAULT_VARIANTS = tuple(name for name in VARIANTS if not name.endswith(STAR_SUFFIX))

flags.DEFINE_bool("from_scratch", False,
                  "Train every variant from random weights with step 1's recipe instead of "
                  "fine-tuning step 1 (the --finetune_* flags are then unused).")
flags.DEFINE_list("variants", list(DEFAULT_VARIANTS),
                  "Variants trained, of: " + ", ".join(VARIANTS)
                  + " (CleanNet* and the *_star variants need w_soft).")
flags.DEFINE_integer("finetune_steps", 1000, "Fine-tuning steps of every variant.")
flags.DEFINE_float("finetune_learning_rate", 0.01,
                   "Fine-tuning initial learning rate (cosine decay).")
flags.DEFINE_integer("finetune_batch_size", 128, "Fine-tuning batch size.")
flags.DEFINE_integer("cleannet_steps", 3000, "CleanNet training steps.")
flags.DEFINE_integer("holdout_classes", 5,
                     "Also fine-tune with w_soft of a CleanNet trained without the "
                     "verification labels of this many classes (0: skip).")
flags.DEFINE_string("clean_from", None,
                    "With --from_scratch: another tools.cifar10n_features --out of the same "
                    "images and step-1 recipe whose from-scratch clean variant is copied "
                    "(test top-1 measured again) instead of trained again.")
flags.DEFINE_string("benchmarks_md", "",
                    "Markdown file whose classification section is regenerated; "
                    "empty: none.")
FLAGS = flags.FLAGS

SECTIONS = {False: "classification", True: "classification-scratch"}  # by from_scratch
WEIGHTED = tuple(name for name in VARIANTS if name.startswith("w_"))
NOISY_COLUMNS = ("worse_label", "aggre_label")
ROWS = {"step1": ("noisy (step 1 only)", "1"), "none": ("noisy", "1"),
        "w_hard": ("noisy", "w_hard (Eq. 13)"), "w_soft": ("noisy", "w_soft (Eq. 12)"),
        "w_soft_balanced": ("noisy", "w_soft, mean 1 per class"),
        "w_soft_holdout": ("noisy", "w_soft, n classes unverified"),
        "w_hard_loss": ("noisy", "w_hard, in the loss"),
        "w_soft_loss": ("noisy", "w_soft, in the loss"),
        "w_soft_balanced_loss": ("noisy", "w_soft, mean 1 per class, in the loss"),
        "w_hard_star": ("noisy", "w_hard of CleanNet* (round 2)"),
        "w_soft_star": ("noisy", "w_soft of CleanNet* (round 2)"),
        "clean": ("clean", "1")}


def clean_class_ids(data_dir, train, class_names):
  """The true labels of the manifest's rows, int64 [N] (same row order)."""
  with open(os.path.join(data_dir, "train.csv"), newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  paths = np.array([os.path.join(os.path.abspath(data_dir), row["path"]) for row in rows],
                   dtype=train.paths.dtype)
  if len(paths) != train.num_rows or not np.all(paths == train.paths):
    raise InputError(f"{train.description}: rows differ from {data_dir}/train.csv; "
                     "rerun tools.cifar10n_features with this --data")
  ids = {name: i for i, name in enumerate(class_names)}
  return np.array([ids[row["clean_label"]] for row in rows], np.int64)


def _noisy_label_column(data_dir, train, class_names):
  """The CIFAR-10N column that the manifest's labels are, or None."""
  with open(os.path.join(data_dir, "train.csv"), newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  names = np.asarray(class_names)[train.class_ids]
  for column in NOISY_COLUMNS:
    if rows and column in rows[0] and np.array_equal(names, [row[column] for row in rows]):
      return column
  return None


def _per_class_weights(class_names, class_ids, truth, w_soft, scored):
  """Per noisy class: rows, noise rate, mean w_soft of all, correct and wrong rows."""
  report = {}
  for class_id, name in enumerate(class_names):
    rows = scored & (class_ids == class_id)
    correct, wrong = rows & (truth == 1), rows & (truth == 0)
    report[name] = {
        "rows": int(rows.sum()), "noise_rate": float(1 - truth[rows].mean()) if rows.any()
        else 0.0,
        **{key: float(w_soft[mask].mean()) if mask.any() else None
           for key, mask in [("mean_w_soft", rows), ("mean_w_soft_correct", correct),
                             ("mean_w_soft_wrong", wrong)]}}
  return report


def _markdown(results):
  lines = ["| training labels | weights | test top-1 |", "|---|---|---|"]
  for name, (labels, weights) in ROWS.items():
    if name in results["top1"]:
      lines.append(f"| {labels} | {weights} | {results['top1'][name]:.4f} |")
  return "\n".join(lines) + "\n"


def _weight(value):
  return "-" if value is None else f"{value:.2f}"


def gap_recovered(top1):
  """Each weighting's share of the noisy-to-clean top-1 gap: (w - none) / (clean - none)."""
  if "none" not in top1 or "clean" not in top1 or top1["clean"] == top1["none"]:
    return {}
  gap = top1["clean"] - top1["none"]
  return {name: (top1[name] - top1["none"]) / gap for name in WEIGHTED if name in top1}


def markdown(result):
  """The BENCHMARKS.md section of a classification result (with its "command")."""
  finetune, step1 = result["finetune"], result["step1"]
  label = f"`{result['label_column']}`" if result["label_column"] else "the noisy labels"
  if result.get("from_scratch"):
    title = "from scratch"
    recipe = (f"Every variant trains from random weights with step 1's recipe "
              f"({finetune['steps']} steps of batch {finetune['batch_size']}, lr "
              f"{finetune['learning_rate']:g} cosine, same seed), so the unweighted noisy "
              "variant is step 1 itself")
  else:
    title = "fine-tuning step 1"
    recipe = (f"Every variant then fine-tunes that same checkpoint for {finetune['steps']} "
              f"steps (batch {finetune['batch_size']}, lr {finetune['learning_rate']:g} "
              "cosine, same seed)")
  recovered = gap_recovered(result["top1"])
  lines = [
      f"## Classification with CleanNet's sample weights, {title} (CIFAR-10N, Table 3 "
      "analog)",
      f"Command: `{result['command']}` (seed {result['seed']}).",
      f"Noisy labels {label} ({result['noise_rate']:.1%} noise), "
      f"{result['num_verified']} verified images ({result['num_verified_per_class']:g} "
      f"per class). Step 1: the small ResNet trained {step1['epochs']:.3g} epochs "
      f"({step1['steps']} steps of batch {step1['batch_size']}) on the noisy labels. "
      f"{recipe}; CleanNet (library defaults, "
      f"{result['cleannet_steps']:,} steps) gives the weights. A weighted variant draws "
      "each row with probability w / max(w) and weighs every drawn image 1 (the "
      "library's default); the rows \"in the loss\" draw every row alike and multiply "
      "its cross-entropy by w instead (Eq. 14 literally). Test top-1 on the "
      f"{step1['test_images']:,} clean test images:", "",
      _markdown(result).rstrip("\n"), ""]
  if recovered:
    lines += ["Share of the test top-1 gap between the noisy and the clean labels (both "
              "unweighted) that each weighting recovers: "
              + ", ".join(f"{ROWS[name][1]} {value:.0%}" for name, value in recovered.items())
              + ".", ""]
  lines += [
      "CleanNet's average per-class detection error: "
      f"{result['cleannet_validation_error']:.1%} on verified validation rows, "
      f"{result['cleannet_all_rows_error']:.1%} on all training rows against the clean "
      f"labels (threshold {result['delta']:.3f}). Its weights per noisy class (mean over "
      "all rows, rows whose label is correct, rows whose label is wrong):", "",
      "| class | rows | noise | mean w_soft | w_soft, correct | w_soft, wrong |",
      "|---|---|---|---|---|---|"]
  lines += [f"| {name} | {row['rows']} | {row['noise_rate']:.1%} | "
            f"{_weight(row['mean_w_soft'])} | {_weight(row['mean_w_soft_correct'])} | "
            f"{_weight(row['mean_w_soft_wrong'])} |"
            for name, row in result["per_class"].items()]
  if result.get("holdout_classes"):
    lines += ["", "\"w_soft, n classes unverified\": the weights of a CleanNet trained "
              f"without the verification labels of {len(result['holdout_classes'])} "
              f"classes ({', '.join(result['holdout_classes'])}), the Fig. 6 analog."]
  errors = result["unverified_rows_error"]
  if "CleanNet*" in errors:
    lines += ["", "CleanNet* (the paper's Table 2 row): CleanNet trained again, with the "
              "same settings and verified rows, on the features of the classifier "
              f"{'trained' if result.get('from_scratch') else 'fine-tuned'} with w_soft. "
              "Average per-class error on the rows without verification labels: "
              f"CleanNet {errors['CleanNet']:.2%}, CleanNet* {errors['CleanNet*']:.2%}."]
  lines += ["", "Mean weight over all scored rows: w_soft "
            f"{result['weights']['w_soft']['mean_weight']:.3f}, w_hard "
            f"{result['weights']['w_hard']['mean_weight']:.3f}."]
  drawn = [f"{ROWS[name][1]} {rows['drawn_noise_rate']:.1%} wrong, "
           f"{rows['correct_kept']:.0%} kept"
           for name, rows in result["weights"].items()
           if rows.get("drawn_noise_rate") is not None]
  if drawn:
    lines += ["", f"What a drawn variant trains on (labels {result['noise_rate']:.1%} "
              "wrong): share of wrong labels among the drawn rows, and share of the "
              "correct rows' draws kept: " + "; ".join(drawn) + "."]
  return "\n".join(lines) + "\n"


def plot(result, path):
  """Test top-1 of each variant as a bar chart PNG (needs matplotlib)."""
  plt = markdown_sections.pyplot("classification plot")
  if plt is None:
    return None
  rows = [name for name in ROWS if name in result["top1"]]
  names = [f"{ROWS[name][0]}\n{textwrap.fill(ROWS[name][1], 12)}" for name in rows]
  values = [100 * result["top1"][name] for name in rows]
  # Grey: unweighted; blue: rows drawn by weight (the default); orange: in the
  # loss; green: drawn by CleanNet*'s weights (round 2).
  colors = ["0.6" if name not in WEIGHTED else "C1" if name.endswith(LOSS_SUFFIX)
            else "C2" if name.endswith(STAR_SUFFIX) else "C0" for name in rows]
  figure, axes = plt.subplots(figsize=(max(7.0, 1.4 * len(rows)), 3.8))
  bars = axes.bar(names, values, color=colors)
  axes.bar_label(bars, fmt="%.2f")
  axes.set_ylabel("test top-1 (%)")
  axes.set_ylim(max(0.0, min(values) - 10), min(100.0, max(values) + 5))
  axes.set_title("CIFAR-10N: training with CleanNet's weights"
                 + (", from scratch" if result.get("from_scratch") else ", fine-tuning"))
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)
  return path


def holdout_cleannet(train, info, out, work, config, num_classes, seed):
  """CleanNet trained without the verification labels of `num_classes` classes.

  The classes are the benchmark's first random split (``tools.benchmark_detection``
  draws split 0 of n the same way). Returns (held-out class ids, the
  ``alternating.score_rows`` dict of its weights for every training row).
  """
  if not 0 < num_classes < info.num_classes:
    raise InputError(f"--holdout_classes={num_classes}: must be between 1 and "
                     f"{info.num_classes - 1} (the data set has {info.num_classes} classes)")
  held_out = np.sort(np.random.default_rng([seed, num_classes, 0]).choice(
      info.num_classes, num_classes, replace=False))
  directory = os.path.join(work, f"holdout-{num_classes}")
  weights_path = os.path.join(directory, alternating.WEIGHTS_FILE)
  if not os.path.exists(weights_path):
    features = os.path.join(directory, "features")
    if os.path.exists(os.path.join(features, data.METADATA_FILE)):
      masked = data.read_info(features)
    else:
      rows = data.load_arrays(info, verification="all")
      masked = data.write_features(
          features, rows["key"], rows["features"], rows["class_id"],
          np.where(np.isin(rows["class_id"], held_out), -1, rows["verification"]),
          info.class_names)
    model_dir = os.path.join(directory, "cleannet")
    if not alternating.is_finished(model_dir, "step2-cleannet"):
      alternating.train_cleannet(masked, model_dir, config,
                                 references_path=os.path.join(out, "references.npz"))
    alternating.save_weights(weights_path,
                             alternating.score_with_cleannet(model_dir, masked, train))
  with np.load(weights_path) as saved:
    return held_out, {name: saved[name] for name in saved.files}


def cleannet_star(train, info, work, config):
  """CleanNet* (paper Table 2): CleanNet again on the w_soft classifier's features.

  Extracts the features of every training image with the backbone trained
  with w_soft, builds K-means reference sets and trains CleanNet with the same
  settings and verified rows; returns ``alternating.score_rows``' dict (kept
  in cleannet-star/weights.npz for a rerun).
  """
  star_dir = os.path.join(work, "cleannet-star")
  weights_path = os.path.join(star_dir, alternating.WEIGHTS_FILE)
  if os.path.exists(weights_path):
    with np.load(weights_path) as saved:
      return {name: saved[name] for name in saved.files}
  features = os.path.join(star_dir, "features")
  if os.path.exists(os.path.join(features, alternating.FEATURES_SUBDIR, data.METADATA_FILE)):
    star_info = data.read_info(os.path.join(features, alternating.FEATURES_SUBDIR))
  else:
    star_info = alternating.extract(train, os.path.join(work, "finetune-w_soft"), features,
                                    batch_size=512)
  if star_info.num_verified != info.num_verified:
    raise InputError(f"{star_info.directory}: {star_info.num_verified} verified rows, "
                     f"the step-1 features {info.num_verified}")
  model_dir = os.path.join(star_dir, "cleannet")
  if not alternating.is_finished(model_dir, "step2-cleannet"):
    alternating.train_cleannet(star_info, model_dir, config)
  weights = alternating.score_with_cleannet(model_dir, star_info, train)
  alternating.save_weights(weights_path, weights)
  return weights


def reuse_clean_variant(other_out, directory, train, config, test):
  """Copies feature run `other_out`'s from-scratch clean variant into `directory`.

  Refused unless that run trained the clean variant on the same images
  (`train`'s paths, in order) with the same recipe (`config`, this run's step
  1): then the copy is the training this run would do. Its test top-1 is
  measured again on `test`.
  """
  source_dir = os.path.join(other_out, SECTIONS[True], "finetune-clean")
  summary_path = os.path.join(source_dir, alternating.SUMMARY_FILE)
  if not os.path.exists(summary_path):
    raise InputError(f"--clean_from: {summary_path}: missing; run this tool with "
                     f"--from_scratch and the clean variant on --out={other_out} first")
  recipe = json.loads(json.dumps(dataclasses.asdict(config)))
  if alternating.read_json(summary_path)["config"] != recipe:
    raise InputError(f"--clean_from: {source_dir} was trained with another recipe than "
                     "this run's step 1")
  other_train = images.read_manifest(os.path.join(other_out, "train.csv"), train.class_names)
  if not np.array_equal(other_train.paths, train.paths):
    raise InputError(f"--clean_from: {other_out}/train.csv lists other training images "
                     "than this run's")
  classifier.reuse_finished(source_dir, directory, test)


def classify(data_dir, out, *, finetune_steps=1000, finetune_learning_rate=0.01,
             finetune_batch_size=128, cleannet_steps=3000, holdout_classes=5, seed=0,
             from_scratch=False, variants=DEFAULT_VARIANTS, clean_from=None):
  """Steps 2-3 and the training of each of `variants`; the result dict.

  `out` is a folder of tools.cifar10n_features (its step 1, features and
  reference sets); `data_dir` the CIFAR-10N folder it was made from. Each
  variant fine-tunes step 1 or, `from_scratch`, trains from random weights
  with step 1's recipe; `clean_from` (from scratch only) is a feature run
  whose clean variant is reused (``reuse_clean_variant``). Results are also
  written to results.json and results.md in <out>/classification
  (<out>/classification-scratch).
  """
  unknown = [name for name in variants if name not in VARIANTS]
  if unknown or not variants:
    raise InputError(f"--variants: {','.join(variants)!r} is not a list of: "
                     + ", ".join(VARIANTS))
  if clean_from and not from_scratch:
    raise InputError("--clean_from: needs --from_scratch (a fine-tuned clean variant "
                     "starts from its own run's step 1)")
  star = [name for name in variants if name.endswith(STAR_SUFFIX)]
  if star and "w_soft" not in variants:
    raise InputError(f"--variants: {star[0]} needs w_soft (CleanNet* is trained on the "
                     "features of its classifier)")
  work = os.path.join(out, SECTIONS[from_scratch])
  step1_dir = os.path.join(out, "step1")
  needed = [os.path.join(step1_dir, alternating.SUMMARY_FILE),
            os.path.join(out, "features", "all", data.METADATA_FILE),
            os.path.join(out, "references.npz")]
  missing = [path for path in needed if not os.path.exists(path)]
  if missing:
    raise InputError(f"{missing[0]}: missing; run tools.cifar10n_features "
                     f"--data={data_dir} --out={out} first")
  class_names = data.read_class_names(os.path.join(out, "classes.txt"))
  train = images.read_manifest(os.path.join(out, "train.csv"), class_names)
  test = images.read_manifest(os.path.join(out, "test.csv"), class_names)
  clean_ids = clean_class_ids(data_dir, train, class_names)
  info = data.read_info(os.path.join(out, "features", "all"))
  step1 = alternating.read_json(os.path.join(step1_dir, alternating.SUMMARY_FILE))
  steps = cleannet_steps
  if from_scratch:
    # Step 1's own recipe, seed included: only the labels and weights differ.
    variant_config = classifier.ClassifierConfig(**{
        **step1["config"], "image_size": tuple(step1["config"]["image_size"])})
  else:
    variant_config = classifier.ClassifierConfig(
        image_size=(32, 32), steps=finetune_steps, global_batch_size=finetune_batch_size,
        learning_rate=finetune_learning_rate, seed=seed,
        init_classifier=os.path.join(step1_dir, classifier.CLASSIFIER_FILE))
  config = alternating.AlternatingConfig(
      finetune=variant_config,
      cleannet=training.TrainConfig(
          steps=steps, lr_decay_steps=max(1, steps * 2 // 3),
          eval_every=max(1, steps // 12), checkpoint_every=max(1, steps // 10), seed=seed))

  cleannet_dir = os.path.join(work, "cleannet")
  if not alternating.is_finished(cleannet_dir, "step2-cleannet"):
    alternating.train_cleannet(info, cleannet_dir, config,
                               references_path=os.path.join(out, "references.npz"))
  validation = alternating.read_json(
      os.path.join(cleannet_dir, alternating.SUMMARY_FILE))["validation"]
  weights_path = os.path.join(work, alternating.WEIGHTS_FILE)
  if not os.path.exists(weights_path):
    alternating.save_weights(weights_path, alternating.score_with_cleannet(
        cleannet_dir, info, train))
  with np.load(weights_path) as saved:
    weights = {name: saved[name] for name in saved.files}

  held_out = np.zeros(0, np.int64)
  if holdout_classes and "w_soft_holdout" in variants:
    held_out, holdout_weights = holdout_cleannet(train, info, out, work, config,
                                                 holdout_classes, seed)
  sources = {"none": (train, None), "w_hard": (train, weights["w_hard"]),
             "w_soft": (train, weights["w_soft"]),
             "w_soft_balanced": (train, weights["w_soft_balanced"]),
             "w_soft_holdout": (train, holdout_weights["w_soft"] if len(held_out) else None),
             "clean": (dataclasses.replace(train, class_ids=clean_ids), None)}
  for name in ("w_hard", "w_soft", "w_soft_balanced"):
    sources[name + LOSS_SUFFIX] = sources[name]
  # From scratch, the unweighted noisy variant would repeat step 1 exactly.
  top1 = {"none": step1["test_top1"]} if from_scratch else {"step1": step1["test_top1"]}
  star_weights = None  # CleanNet*'s, once the w_soft variant has trained
  for name in VARIANTS:
    if (name not in variants or name in top1
        or (name == "w_soft_holdout" and not len(held_out))):
      continue
    directory = os.path.join(work, f"finetune-{name}")
    if not os.path.exists(os.path.join(directory, alternating.SUMMARY_FILE)):
      if name.endswith(STAR_SUFFIX):
        star_weights = star_weights or cleannet_star(train, info, work, config)
        sources[name] = (train, star_weights[name.removesuffix(STAR_SUFFIX)])
      if name == "clean" and clean_from:
        reuse_clean_variant(clean_from, directory, train, variant_config, test)
        top1[name] = alternating.read_json(
            os.path.join(directory, alternating.SUMMARY_FILE))["test_top1"]
        continue
      source, sample_weights = sources[name]
      variant = (dataclasses.replace(config.finetune, sample_weighting="loss")
                 if name.endswith(LOSS_SUFFIX) else config.finetune)
      classifier.ClassifierTrainer(source, directory, variant,
                                   sample_weights=sample_weights).train(test)
    top1[name] = alternating.read_json(
        os.path.join(directory, alternating.SUMMARY_FILE))["test_top1"]

  # CIFAR-10N knows every row's truth: CleanNet's detection on all 50k rows.
  scored = weights["scored"]
  truth = (train.class_ids == clean_ids).astype(np.int64)
  all_rows = detection.detection_metrics(train.class_ids[scored], truth[scored],
                                         weights["score"][scored],
                                         weights["thresholds"][train.class_ids[scored]])
  detectors = {"CleanNet": weights}
  if "w_soft" in variants:
    detectors["CleanNet*"] = star_weights or cleannet_star(train, info, work, config)
  # All on the rows without verification labels, as the detection benchmark.
  unverified = (train.verification < 0) & np.logical_and.reduce(
      [found["scored"] for found in detectors.values()])
  unverified_error = {
      name: detection.detection_metrics(
          train.class_ids[unverified], truth[unverified], found["score"][unverified],
          found["thresholds"][train.class_ids[unverified]])["avg_class_error"]
      for name, found in detectors.items()}
  results = {
      "top1": top1,
      "gap_recovered": gap_recovered(top1),
      "from_scratch": from_scratch,
      "noise_rate": float(1 - truth.mean()),
      "cleannet_validation_error": validation["avg_class_error"],
      "cleannet_cv_validation_error": validation.get("cv_avg_class_error"),
      "cleannet_all_rows_error": all_rows["avg_class_error"],
      "unverified_rows_error": unverified_error,
      "holdout_classes": [class_names[c] for c in held_out],
      "delta": float(weights["delta"]),
      "weights": {name: {**alternating.weight_stats(weights[name], scored),
                         **detection.drawn_rows(weights[name], truth)}
                  for name in ("w_soft", "w_hard", "w_soft_balanced")},
      "finetune": {"steps": variant_config.steps,
                   "learning_rate": variant_config.learning_rate,
                   "batch_size": variant_config.global_batch_size},
      "cleannet_steps": steps,
      "seed": seed,
      "label_column": _noisy_label_column(data_dir, train, class_names),
      "num_verified": info.num_verified,
      "num_verified_per_class": info.num_verified / len(class_names),
      "step1": {"steps": step1["steps"],
                "batch_size": step1["config"]["global_batch_size"],
                "epochs": step1["steps"] * step1["config"]["global_batch_size"]
                          / step1["train_rows"],
                "test_images": step1.get("test_images", 0)},
      "per_class": _per_class_weights(class_names, train.class_ids, truth,
                                      weights["w_soft"], scored),
  }
  if "CleanNet*" in detectors:
    star = detectors["CleanNet*"]
    results["weights"]["w_soft_star"] = {
        **alternating.weight_stats(star["w_soft"], star["scored"]),
        **detection.drawn_rows(star["w_soft"], truth)}
  data.atomic_write_text(os.path.join(work, "results.json"),
                         json.dumps(results, indent=2) + "\n")
  data.atomic_write_text(os.path.join(work, "results.md"), _markdown(results))
  return results


def main(_):
  results = classify(FLAGS.data, FLAGS.out, finetune_steps=FLAGS.finetune_steps,
                     finetune_learning_rate=FLAGS.finetune_learning_rate,
                     finetune_batch_size=FLAGS.finetune_batch_size,
                     cleannet_steps=FLAGS.cleannet_steps,
                     holdout_classes=FLAGS.holdout_classes, seed=FLAGS.seed,
                     from_scratch=FLAGS.from_scratch, variants=FLAGS.variants,
                     clean_from=FLAGS.clean_from)
  results["command"] = "python -m tools.cifar10n_classification " + shlex.join(sys.argv[1:])
  print(json.dumps(results, indent=2))
  print(_markdown(results))
  section = SECTIONS[FLAGS.from_scratch]
  plot(results, os.path.join(FLAGS.out, section, "top1.png"))
  if FLAGS.benchmarks_md:
    markdown_sections.update_file(FLAGS.benchmarks_md, section, markdown(results))


def run():
  common.run(main)


if __name__ == "__main__":
  run()
