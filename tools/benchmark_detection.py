"""Label-noise detection benchmark on CIFAR-10N features: Table 2 and Fig. 5 analogs.

  python -m tools.benchmark_detection --run_dir=runs/cifar10n \
      --clean_labels=/path/to/cifar10n/train.csv [--cleannet_steps=6000]

Inputs default to what ``tools.cifar10n_features --out=<run_dir>`` writes: the
feature set <run_dir>/features/all (its noisy labels are that run's
--label_column, worse_label or aggre_label), <run_dir>/references.npz, the
step-1 CNN <run_dir>/step1/classifier.keras and its manifest
<run_dir>/train.csv. --clean_labels is CIFAR-10N's own train.csv (column
clean_label; its paths are relative to its folder).

Every method scores every row; one threshold per method is chosen on verified
validation rows (``detection.choose_threshold``) and the average per-class
error is measured on all rows without verification labels against the clean
labels. The transfer part holds out the verification labels of n classes and
measures only on those classes. Writes <out>/detection_benchmark.json,
<out>/transfer.png (if matplotlib is installed) and regenerates the section of
--benchmarks_md between its detection markers. The CleanNet model flags are
those of ``tools.train_cleannet``; --cleannet_steps sets its steps here.
"""

import dataclasses
import json
import os
import resource
import shlex
import sys
import time

from absl import flags
from absl import logging
import numpy as np
from scipy import stats

from tools import cleannet_flags, common, markdown_sections
from cleannet_tf import baselines, classifier, data, detection, images, references, scoring
from cleannet_tf import training
from cleannet_tf.errors import InputError

flags.DEFINE_string("run_dir", None, "Output folder of tools.cifar10n_features.")
flags.DEFINE_string("features", None, "Feature set; default <run_dir>/features/all.")
flags.DEFINE_string("references", None, "Reference sets; default <run_dir>/references.npz.")
flags.DEFINE_string("classifier", None,
                    "Step-1 CNN for classification filtering; default "
                    "<run_dir>/step1/classifier.keras.")
flags.DEFINE_string("manifest", None,
                    "Image manifest of the feature set's rows; default <run_dir>/train.csv.")
flags.DEFINE_string("clean_labels", None, "CIFAR-10N train.csv with column clean_label.")
flags.DEFINE_string("out", None, "Output folder; default <run_dir>/detection_benchmark.")
flags.DEFINE_integer("cleannet_steps", 3000,
                     "CleanNet training steps per run; unless given, --lr_decay_steps is "
                     "2/3 and --eval_every 1/12 of them.")
flags.DEFINE_integer("cleannet_repeats", 1,
                     "CleanNet full-supervision runs with seeds --seed, --seed+1, ... on the "
                     "same validation split; more than one adds their mean and spread.")
flags.DEFINE_list("transfer_n", ["3", "5", "7"],
                  "Numbers of classes whose verification labels are held out.")
flags.DEFINE_integer("transfer_splits", 3, "Random class splits per n.")
flags.DEFINE_string("benchmarks_md", "BENCHMARKS.md",
                    "Markdown file whose detection section is regenerated; empty: none.")
flags.DEFINE_string("section", None,
                    "Name of that section; default detection-<label column> from "
                    "<run_dir>/manifests.json, else detection.")
flags.DEFINE_list("ablations", [],
                  "CleanNet variants (names in ABLATIONS, or 'all') also trained on "
                  "full supervision and on transfer with --ablation_transfer_n held out.")
flags.DEFINE_integer("ablation_transfer_n", 5, "Classes held out in the ablation's transfer.")
flags.DEFINE_integer("ablation_seeds", 1,
                     "Runs per ablation variant, defaults included, with seeds --seed, "
                     "--seed+1, ... (initial weights and batch order; the validation rows "
                     "and class splits stay those of --seed); more than one makes every "
                     "column the mean over seeds, so that variants are compared beyond "
                     "one run's batch order.", lower_bound=1)
flags.DEFINE_integer("cleannet_workers", 1,
                     "CleanNet runs of the repeats, transfer and ablations trained at once, "
                     "each in its own process (training.train_in_processes) before the "
                     "tables are computed; the timed full-supervision run trains alone.")
flags.mark_flags_as_required(["clean_labels"])
FLAGS = flags.FLAGS

IMAGE_SIZE = (32, 32)

# CleanNet variants for --ablations: name -> (what it is, overrides of the
# library's defaults; ``training.with_overrides``).
ABLATIONS = {
    "paper": ("the paper's and release's settings", training.PAPER_SETTINGS),
    "log1p_only": ("features not standardised (log1p only, as the release)",
                   {"standardize_features": False}),
    "sgd": ("SGD with momentum, lr 0.01 (the release)",
            {"optimizer": "sgd", "learning_rate": 0.01}),
    "beta_0.1": ("reconstruction weight beta 0.1 (the paper)", {"beta": 0.1}),
    "no_cross_class_negatives": ("without verified cross-class negatives",
                                 {"cross_class_negatives": 0.0}),
    "no_class_separation": ("without the class separation penalty",
                            {"class_separation": 0.0}),
    "no_weight_averaging": ("the last step's weights, not their moving average",
                            {"weight_averaging": 0.0}),
    "paper_pseudo_labels": ("the paper's Eq. 8 pseudo-labels (threshold rho, gamma 0.1)",
                            {"gamma": 0.1, "pseudo_label_margin": 0.1}),
    "unverified_negatives": ("plus unverified cross-class negatives",
                             {"unverified_cross_class_negatives": 0.25}),
    "pseudo_label_quantile_0.2": ("the lowest-scoring 20% of a batch's unverified queries "
                                  "not pulled (Eq. 8 pseudo-label 0)",
                                  {"pseudo_label_quantile": 0.2}),
    "pseudo_label_noise_rate": ("the lowest-scoring share of a batch's unverified queries "
                                "not pulled, the share = the verified rows' noise rate",
                                {"pseudo_label_quantile": None}),
    "nearest_negatives_3": ("cross-class negatives drawn among the 3 nearest classes",
                            {"negative_neighbors": 3}),
    "nearest_unverified_negatives_3": (
        "plus unverified cross-class negatives, both drawn among the 3 nearest classes",
        {"negative_neighbors": 3, "unverified_cross_class_negatives": 0.25}),
    "negative_weight_2.5": ("omega 2.5 (release 5)", {"negative_weight": 2.5}),
    "dropout": ("dropout 0.2 in the reference MLP", {"dropout": 0.2}),
    "paper_embeddings": ("embeddings 128 wide, query hidden layer 256 (the paper; "
                         "default 256 and 512)",
                         {"embedding_dim": 128, "query_hidden_dim": 256}),
    "narrower_embeddings": ("embeddings 64 wide, query hidden layer 128",
                            {"embedding_dim": 64, "query_hidden_dim": 128}),
    "learning_rate_3e-4": ("Adam learning rate 3e-4 (default 1e-3)",
                           {"learning_rate": 3e-4}),
    "unverified_fraction_0.25": ("a quarter of each batch unverified (the paper: half)",
                                 {"unverified_fraction": 0.25}),
    "longer_averaging": ("6000 steps (lr decay at 4000) and weight averaging decay 0.999 "
                         "(default 3000, 2000, 0.998)",
                         {"steps": 6000, "lr_decay_steps": 4000, "weight_averaging": 0.999}),
    "weight_decay_1e-3": ("L2 weight decay 1e-3 (release 1e-4)", {"weight_decay": 1e-3}),
    # K-means sets with another K, built by ``variant_references``.
    "references_20": ("K=20 references per class (default 50)", {"num_references": 20}),
    "references_100": ("K=100 references per class (default 50)", {"num_references": 100}),
    "minimum_threshold": ("delta at the lowest validation error (the paper's rule), "
                          "with the tie band in transfer", {"threshold_rule": "minimum"}),
    "exact_threshold_ties": ("delta at the exact lowest validation error, in transfer "
                             "too (no tie band)",
                             {"threshold_rule": "minimum", "threshold_tie_band": 0.0}),
    "refined_references": ("trained again on reference sets rebuilt from the rows the "
                           "first model scores >= delta (training.refined_reference_sets)",
                           {"reference_refinement": 1}),
    "transfer_thresholds": ("delta moved by each unverified class's score quartiles "
                            "(detection.class_thresholds)", {"transfer_thresholds": True}),
}

# Methods whose scores take a few levels (a constant, minus a rank, a flag):
# their threshold is the lowest validation error over those levels, which for
# classification filtering is choosing K; a calibration fit of the
# verification labels on so few levels says nothing more.
FEW_LEVEL_METHODS = ("naive", "classification filtering (step-1 CNN)",
                     "cleanlab find_label_issues")

PROTOCOL = """\
Protocol. Verified rows are the feature set's verification labels (drawn per
class with a seed by `tools.prepare_cifar10n`). They are split per class into
training and validation rows (`training.split_verified`, --val_fraction, --seed).
Every method is fit on the verified training rows only (the unsupervised and
weakly supervised ones on none), and its one threshold for all classes is
chosen on the verified validation rows only: by --threshold_rule for methods
with continuous scores, CleanNet's included, and at the lowest validation
error for those with a few score levels (naive, classification filtering,
cleanlab), where a calibration fit has nothing to fit. Error = average per-class error
on all rows WITHOUT verification labels, truth = (noisy label == clean label).
No evaluation row's label and no clean label is used to fit or to choose a
threshold. Supervised baselines are per-class binary classifiers on the
signed-log1p, standardised features; a class with fewer than two distinct
verified labels falls back to a constant (naive where it has none).
Classification filtering keeps a row whose noisy label is in the step-1 CNN's
top-K (K chosen on validation rows); cleanlab is `find_label_issues` on 5-fold
cross-validated softmax-regression probabilities of the features, as shipped
(no threshold to tune); the unsupervised baseline is a per-class
IsolationForest. Peak RSS is the growth of the process's peak resident memory
during the method (methods run in one process, so a method that needs less
than an earlier peak shows 0)."""


def _default(value, *parts):
  if value:
    return value
  if not FLAGS.run_dir:
    raise InputError(f"--run_dir is needed to locate {os.path.join(*parts)}")
  return os.path.join(FLAGS.run_dir, *parts)


def _align(keys, wanted, what):
  """Index into `keys` of each of `wanted` (str arrays); InputError if missing."""
  order = np.argsort(keys)
  position = np.minimum(np.searchsorted(keys[order], wanted), len(keys) - 1)
  found = keys[order][position] == wanted
  if not found.all():
    raise InputError(f"{what}: no row for key {wanted[np.argmin(found)]!r}")
  return order[position]


def clean_class_ids(path, class_names, keys):
  """int [N]: clean class of each feature row, matched by image path."""
  table = np.genfromtxt(path, delimiter=",", names=True, dtype=None, encoding="utf-8")
  if not {"path", "clean_label"} <= set(table.dtype.names):
    raise InputError(f"{path}: needs columns path and clean_label")
  root = os.path.dirname(os.path.abspath(path))
  paths = np.char.add(root + os.sep, table["path"].astype(str))
  lookup = {name: i for i, name in enumerate(class_names)}
  unknown = set(np.unique(table["clean_label"]).tolist()) - set(lookup)
  if unknown:
    raise InputError(f"{path}: clean labels not among the classes: {sorted(unknown)}")
  clean = np.vectorize(lookup.get, otypes=[np.int64])(table["clean_label"])
  return clean[_align(paths, keys, path)]


def rows_with_truth(features_dir, clean_labels):
  """(info, every row's arrays, truth int [N]) of a feature set.

  truth is 1 where the row's noisy label is its clean label (`clean_labels`,
  a CSV with columns path and clean_label).
  """
  info = data.read_info(features_dir)
  rows = data.load_arrays(info, verification="all")
  truth = (rows["class_id"] == clean_class_ids(clean_labels, info.class_names,
                                               rows["key"].astype(str))).astype(np.int64)
  return info, rows, truth


def cnn_probabilities(model_path, manifest_path, class_names, keys, batch_size=512):
  """float [N, L]: the step-1 CNN's outputs on each feature row's image."""
  model = common.load_keras(model_path, "the step-1 classifier")
  source = images.read_manifest(manifest_path, class_names)
  outputs, seen = [], []
  for batch in images.image_dataset(source, IMAGE_SIZE, batch_size).as_numpy_iterator():
    outputs.append(np.asarray(model(batch["image"], training=False), np.float32))
    seen.append(batch["key"].astype(str))
  return np.concatenate(outputs)[_align(np.concatenate(seen), keys, manifest_path)]


def measured(fn, *args):
  """(fn(*args), seconds, growth of the peak RSS in MiB)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  started = time.perf_counter()
  result = fn(*args)
  seconds = time.perf_counter() - started
  growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
  return result, seconds, growth


def verified_split(verification, class_ids, seed):
  """(train, val) row indices: the split ``training.Trainer`` makes."""
  verified = np.flatnonzero(verification >= 0)
  train, val = training.split_verified(class_ids[verified], FLAGS.val_fraction, seed)
  return verified[train], verified[val]


def threshold_and_error(scores, class_ids, verification, val, evaluated, truth,
                        rule=None, transfer_tie_band=None, thresholds_of=None):
  """Threshold chosen on `val` rows; its validation and evaluation errors.

  The library's rule (``training.evaluate``'s): ``detection.choose_threshold``
  with `rule` (default --threshold_rule) and, for the rule "minimum", the tie
  band `transfer_tie_band` (default --threshold_tie_band) when `evaluated`
  holds classes without validation rows (transfer), exact ties otherwise.
  `thresholds_of` (CleanNet's, ``cleannet_run``) maps delta to every class's
  threshold, for the classes without verification labels; then they decide
  the evaluated rows and are returned as "thresholds" [L].
  """
  if rule is None:
    rule = FLAGS.threshold_rule
  if transfer_tie_band is None:
    transfer_tie_band = FLAGS.threshold_tie_band
  delta, val_error = detection.choose_threshold(
      class_ids[val], verification[val], scores[val], rule,
      detection.transfer_tie_band(class_ids[val], class_ids[evaluated], transfer_tie_band))
  result = {"delta": delta, "val_error": val_error}
  if thresholds_of is not None:
    result["thresholds"] = thresholds_of(delta).tolist()
  error = detection.average_per_class_error(
      class_ids[evaluated], truth[evaluated],
      detection.decisions(scores[evaluated],
                          _at_classes(result.get("thresholds", delta), class_ids[evaluated])))
  return {**result, "error": error}


def method_rule(name):
  """The threshold rule of benchmark method `name`: FEW_LEVEL_METHODS' or --threshold_rule."""
  return "minimum" if name in FEW_LEVEL_METHODS else FLAGS.threshold_rule


def _at_classes(thresholds, class_ids):
  """A scalar delta as is; per-class thresholds [L] taken at each of `class_ids`."""
  return np.asarray(thresholds)[class_ids] if np.ndim(thresholds) else thresholds


def held_out_verified_error(scores, class_ids, verification, held_out, thresholds):
  """Error at `thresholds` (delta, or one per class [L]) on the held-out classes' verified rows.

  Verified rows only, so it is what a variant may be chosen on in transfer:
  those classes' verification labels were hidden from training and from the
  threshold, and no evaluation row or clean label enters it.
  """
  rows = np.isin(class_ids, held_out) & (verification >= 0)
  return detection.average_per_class_error(
      class_ids[rows], verification[rows],
      detection.decisions(scores[rows], _at_classes(thresholds, class_ids[rows])))


def variant_references(reference_sets, overrides, info, out):
  """The reference sets of a run with `overrides`.

  `reference_sets` (the features stage's), unless `overrides` set
  num_references to another K: then per-class K-means sets with that K, built
  from `info`'s rows and noisy labels as the features stage builds its own
  (``references.build_references_streamed``, seed --seed) and kept in
  <out>/references-k<K>.npz for the other runs and a rerun.
  """
  k = (overrides or {}).get("num_references")
  if k is None or k == reference_sets.k:
    return reference_sets
  path = os.path.join(out, f"references-k{k}.npz")
  if not os.path.exists(path):
    os.makedirs(out, exist_ok=True)
    references.build_references_streamed(info, k=k, seed=FLAGS.seed).save(path)
  return references.ReferenceSets.load(path)


def cleannet_settings(info, reference_sets, overrides=None):
  """(model config, TrainConfig) of a CleanNet run on `info`: the flags'.

  `overrides` {setting: value} changes them (``training.with_overrides``), for
  ablations and repeats.
  """
  model_config = cleannet_flags.model_config(info.num_classes, info.dim)
  model_config["num_references"] = reference_sets.k
  config = dataclasses.replace(cleannet_flags.train_config(), steps=FLAGS.cleannet_steps)
  # Far fewer steps than the release's 60k on 50k rows: decay and validate
  # correspondingly sooner, unless the flags say otherwise.
  if not FLAGS["lr_decay_steps"].present:
    config = dataclasses.replace(config, lr_decay_steps=max(1, FLAGS.cleannet_steps * 2 // 3))
  if not FLAGS["eval_every"].present:
    config = dataclasses.replace(config, eval_every=max(1, FLAGS.cleannet_steps // 12))
  return training.with_overrides(model_config, config, overrides or {})


def cleannet_run(info, reference_sets, model_dir, features, class_ids, overrides=None):
  """Trains CleanNet on `info` (resuming in `model_dir`) and scores every row.

  Returns (scores float64 [N], thresholds_of): thresholds_of maps a delta to
  every class's threshold as the model moves it for classes without
  verification labels (``detection.class_thresholds`` with its quartiles).
  """
  model_config, config = cleannet_settings(info, reference_sets, overrides)
  model = training.Trainer(model_config, reference_sets, info, model_dir, config).train().model
  scores = scoring.Scorer(model).score(features, class_ids).astype(np.float64)
  quartiles, verified = model.score_quartiles.numpy(), model.verified_classes.numpy()
  return scores, lambda delta: detection.class_thresholds(delta, quartiles, verified)


def cleannet_scores(info, reference_sets, model_dir, features, class_ids, overrides=None):
  """``cleannet_run``'s scores: with every class verified, its thresholds are delta."""
  return cleannet_run(info, reference_sets, model_dir, features, class_ids, overrides)[0]


def seeded_run(model_dir, repeat, overrides=None):
  """(model directory, overrides) of `model_dir`'s run with seed --seed + `repeat`.

  Repeat 0 is the run itself; a later one trains in <model_dir>-seed<seed> on
  the validation split of --seed, so that only its initial weights and batch
  order differ.
  """
  if repeat == 0:
    return model_dir, overrides
  seed = FLAGS.seed + repeat
  return f"{model_dir}-seed{seed}", {**(overrides or {}), "seed": seed, "split_seed": FLAGS.seed}


def ablation_model_dir(out, variant=None):
  """Model directory of ablation `variant` (None: the defaults) with full supervision."""
  return os.path.join(out, f"cleannet-{_slug(variant)}" if variant else "cleannet")


def transfer_model_dir(out, n, split, variant=None):
  """Model directory of CleanNet (or ablation `variant`) with split `split` of n held out."""
  return os.path.join(out, f"transfer_n{n}_split{split}",
                      f"cleannet-{_slug(variant)}" if variant else "cleannet")


def ablation_variants(with_defaults=False):
  """--ablations as {name: (description, overrides)}.

  `with_defaults` puts first the run with the flags as given, named None.
  """
  names = list(ABLATIONS) if FLAGS.ablations == ["all"] else FLAGS.ablations
  unknown = sorted(set(names) - set(ABLATIONS))
  if unknown:
    raise InputError(f"--ablations: unknown variant {unknown[0]!r}; known: "
                     + ", ".join(ABLATIONS))
  defaults = {None: ("the library's defaults (this run's flags)", None)} if with_defaults else {}
  return {**defaults, **{name: ABLATIONS[name] for name in names}}


def cleannet_runs(rows, reference_sets, info, out):
  """Every CleanNet run of the repeats, transfer and ablations, as training.TrainingRun.

  The runs that ``full_supervision``, ``transfer`` and ``ablation`` train (the
  same model directories and settings), apart from the timed
  full-supervision run; trained beforehand by ``training.train_in_processes``,
  they find their models finished.
  """
  cleannet = ablation_model_dir(out)
  planned = [(info, *seeded_run(cleannet, repeat))
             for repeat in range(1, FLAGS.cleannet_repeats)]
  for n in map(int, FLAGS.transfer_n):
    for split in range(FLAGS.transfer_splits if n else 0):
      masked_info = held_out_split(rows, n, split, info, out)[-1]
      planned.append((masked_info, transfer_model_dir(out, n, split), None))
  n = FLAGS.ablation_transfer_n
  variants = ablation_variants(with_defaults=True) if FLAGS.ablations else {}
  for name, (_, overrides) in variants.items():
    for repeat in range(FLAGS.ablation_seeds):
      planned.append((info, *seeded_run(ablation_model_dir(out, name), repeat, overrides)))
      for split in range(FLAGS.transfer_splits if n else 0):
        masked_info = held_out_split(rows, n, split, info, out)[-1]
        planned.append((masked_info, *seeded_run(transfer_model_dir(out, n, split, name),
                                                 repeat, overrides)))
  # The defaults' runs of the ablation are also the table's; the timed one trains alone.
  unique = {}
  for run_info, model_dir, overrides in planned:
    if model_dir != cleannet:
      unique.setdefault(model_dir, (run_info, model_dir, overrides))
  planned = list(unique.values())
  runs = []
  for run_info, model_dir, overrides in planned:
    run_references = variant_references(reference_sets, overrides, info, out)
    model_config, config = cleannet_settings(run_info, run_references, overrides)
    runs.append(training.TrainingRun(model_config, run_references, run_info.directory,
                                     model_dir, config))
  return runs


def full_supervision(rows, truth, reference_sets, probabilities, info, out):
  """Table 2 analog: every method, its error on the unverified rows and its cost."""
  class_ids, verification = rows["class_id"], rows["verification"]
  train, val = verified_split(verification, class_ids, FLAGS.seed)
  problem = baselines.Problem(rows["features"], class_ids, train, verification[train],
                              info.num_classes, FLAGS.seed)
  methods = {
      "naive": (baselines.naive, problem),
      "average baseline": (baselines.average_baseline, problem, reference_sets.features,
                           reference_sets.counts),
      **{name: (method, problem) for name, method in baselines.SUPERVISED.items()},
      "IsolationForest (unsupervised)": (baselines.isolation_forest, problem),
      "classification filtering (step-1 CNN)": (
          lambda p: baselines.classification_filtering(p, probabilities()), problem),
  }
  if baselines.cleanlab_available():
    methods["cleanlab find_label_issues"] = (
        lambda p: baselines.cleanlab_issues(p, baselines.cross_validated_probabilities(p)),
        problem)
  else:
    logging.warning("cleanlab is not installed: its baseline is skipped")
  methods["CleanNet"] = (cleannet_scores, info, reference_sets, ablation_model_dir(out),
                         rows["features"], class_ids)
  evaluated = verification < 0
  results, scores = {}, {}
  for name, (fn, *args) in methods.items():
    logging.info("Detection benchmark: %s", name)
    scores[name], seconds, growth = measured(fn, *args)
    results[name] = {**threshold_and_error(scores[name], class_ids, verification, val,
                                           evaluated, truth, method_rule(name)),
                     "seconds": seconds, "peak_rss_growth_mib": growth}
  repeats = [results["CleanNet"]["error"]]
  for repeat in range(1, FLAGS.cleannet_repeats):
    logging.info("Detection benchmark: CleanNet, repeat %d", repeat)
    model_dir, overrides = seeded_run(ablation_model_dir(out), repeat)
    repeat_scores = cleannet_scores(info, reference_sets, model_dir, rows["features"],
                                    class_ids, overrides)
    repeats.append(threshold_and_error(repeat_scores, class_ids, verification, val,
                                       evaluated, truth)["error"])
  fallback = baselines.fallback_classes(problem)
  return {"methods": results, "cleannet_repeat_errors": repeats,
          "cleanlab_installed": baselines.cleanlab_available(),
          "supervised_fallback_classes": [info.class_names[c] for c in fallback],
          "num_train_verified": len(train), "num_val_verified": len(val),
          "num_evaluated": int(evaluated.sum())}, scores


def held_out_split(rows, n, split, info, out):
  """The n classes of random split `split` whose verification labels are hidden.

  Returns (held-out class ids, masked verification [N], evaluated mask [N],
  validation row indices, feature set with the masked labels). The feature set
  is written once under <out>/transfer_n<n>_split<split>/ and reused.
  """
  class_ids, verification = rows["class_id"], rows["verification"]
  rng = np.random.default_rng([FLAGS.seed, n, split])
  held_out = np.sort(rng.choice(info.num_classes, n, replace=False))
  in_held_out = np.isin(class_ids, held_out)
  masked = np.where(in_held_out, -1, verification)
  evaluated = in_held_out & (verification < 0)
  _, val = verified_split(masked, class_ids, FLAGS.seed)
  directory = os.path.join(out, f"transfer_n{n}_split{split}", "features")
  if os.path.exists(os.path.join(directory, data.METADATA_FILE)):
    masked_info = data.read_info(directory)
  else:
    masked_info = data.write_features(directory, rows["key"], rows["features"], class_ids,
                                      masked, info.class_names)
  return held_out, masked, evaluated, val, masked_info


def transfer(rows, truth, reference_sets, full_scores, full_results, info, out):
  """Fig. 5 analog: verification labels of n classes held out, error on those.

  n = 0 holds nothing out: its errors are the full-supervision ones, on all
  classes.
  """
  class_ids = rows["class_id"]
  reused = [name for name in full_scores
            if name.startswith(("classification filtering", "cleanlab"))]
  report = {}
  for n in map(int, FLAGS.transfer_n):
    runs = []
    if n == 0:
      errors = {name: full_results[name]["error"] for name in ["naive", *reused]}
      errors["MLP (all labels)"] = full_results["MLP"]["error"]
      errors["CleanNet"] = full_results["CleanNet"]["error"]
      runs.append({"held_out": [], "errors": errors})
    for split in range(FLAGS.transfer_splits if n else 0):
      held_out, masked, evaluated, val, masked_info = held_out_split(rows, n, split, info,
                                                                    out)
      errors = {name: threshold_and_error(full_scores[name], class_ids, masked, val,
                                          evaluated, truth, method_rule(name))["error"]
                for name in ["naive", *reused]}
      # The MLP keeps every class's labels, so its full-supervision threshold.
      errors["MLP (all labels)"] = detection.average_per_class_error(
          class_ids[evaluated], truth[evaluated],
          detection.decisions(full_scores["MLP"][evaluated],
                              full_results["MLP"]["delta"]))
      scores, thresholds_of = cleannet_run(masked_info, reference_sets,
                                           transfer_model_dir(out, n, split),
                                           rows["features"], class_ids)
      cleannet = threshold_and_error(scores, class_ids, masked, val, evaluated, truth,
                                     thresholds_of=thresholds_of)
      errors["CleanNet"] = cleannet["error"]
      runs.append({"held_out": [info.class_names[c] for c in held_out], "errors": errors,
                   "cleannet_held_out_verified_error": held_out_verified_error(
                       scores, class_ids, rows["verification"], held_out,
                       cleannet["thresholds"])})
    names = list(runs[0]["errors"])
    values = np.array([[run["errors"][name] for name in names] for run in runs])
    report[n] = {"splits": runs, "mean": dict(zip(names, values.mean(0).tolist())),
                 "std": dict(zip(names, values.std(0).tolist()))}
  return report


def ablation(rows, truth, reference_sets, info, out):
  """Each --ablations variant: CleanNet trained with its overrides of the flags.

  Full supervision (error on all unverified rows) and transfer with
  --ablation_transfer_n classes held out over the same --transfer_splits
  splits, each with --ablation_seeds seeds; the first row is the run with the
  flags as given (shipped defaults), whose seed --seed runs are the tables'.
  Returns {name: {"description", "overrides", "val_error" and "error" [one
  per seed], "transfer" and "held_out_verified" [one per seed and split]}}.
  """
  class_ids, verification = rows["class_id"], rows["verification"]
  _, val = verified_split(verification, class_ids, FLAGS.seed)
  n = FLAGS.ablation_transfer_n
  report = {}
  for name, (description, overrides) in ablation_variants(with_defaults=True).items():
    logging.info("Ablation: %s %s", name or "defaults", overrides)
    result = {"description": description, "overrides": overrides or {}, "val_error": [],
              "error": [], "transfer": [], "held_out_verified": []}
    variant_sets = variant_references(reference_sets, overrides, info, out)
    rule = (overrides or {}).get("threshold_rule", FLAGS.threshold_rule)
    tie_band = (overrides or {}).get("threshold_tie_band", FLAGS.threshold_tie_band)
    for repeat in range(FLAGS.ablation_seeds):
      model_dir, run_overrides = seeded_run(ablation_model_dir(out, name), repeat, overrides)
      scores = cleannet_scores(info, variant_sets, model_dir, rows["features"], class_ids,
                               run_overrides)
      full = threshold_and_error(scores, class_ids, verification, val, verification < 0,
                                 truth, rule)
      result["val_error"].append(full["val_error"])
      result["error"].append(full["error"])
      for split in range(FLAGS.transfer_splits if n else 0):
        held_out, masked, evaluated, split_val, masked_info = held_out_split(
            rows, n, split, info, out)
        model_dir, run_overrides = seeded_run(transfer_model_dir(out, n, split, name),
                                              repeat, overrides)
        scores, thresholds_of = cleannet_run(masked_info, variant_sets, model_dir,
                                             rows["features"], class_ids, run_overrides)
        split_result = threshold_and_error(scores, class_ids, masked, split_val, evaluated,
                                           truth, rule, tie_band, thresholds_of)
        result["transfer"].append(split_result["error"])
        result["held_out_verified"].append(held_out_verified_error(
            scores, class_ids, verification, held_out, split_result["thresholds"]))
    report[name or "defaults"] = result
  return report


def _slug(name):
  return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def section_name(run_dir, section=None):
  """`section`, else detection-<label column> of the run's manifests, else detection."""
  if section:
    return section
  # Written by tools.prepare_cifar10n (MANIFESTS_RECORD); importing that tool
  # here would redefine its --out and --seed flags.
  record = os.path.join(run_dir or "", "manifests.json")
  if run_dir and os.path.exists(record):
    with open(record, encoding="utf-8") as f:
      return "detection-" + json.load(f)["label_column"]
  return "detection"


def _percent(value):
  return f"{100 * value:.2f}%"


def _rank_correlation(a, b):
  """Spearman's rank correlation of two equally long sequences (ties averaged)."""
  return float(stats.spearmanr(a, b).statistic)


def _mean_and_std(values):
  return f"{_percent(np.mean(values))} ± {_percent(np.std(values))}" if values else "—"


def _one_or_mean(values):
  """One run's value, or the mean ± standard deviation of several."""
  return _percent(values[0]) if len(values) == 1 else _mean_and_std(values)


def held_out_any(transfer_report):
  """Whether the transfer report holds verification labels out (n > 0)."""
  return any(int(n) > 0 for n in transfer_report)


def markdown(result):
  """The BENCHMARKS.md section (between the markers) for a benchmark result."""
  full = result["full"]
  title = ("## Label-noise detection on CIFAR-10N features (Table 2 and Fig. 5 analogs)"
           if result.get("ablation_seeds", 1) == 1 else
           "## CleanNet variants over several seeds on CIFAR-10N features")
  lines = [
      title,
      f"Command: `{result['command']}` (seed {result['seed']}; "
      f"{result['cleannet_steps']} CleanNet steps per run).",
      f"Noisy labels: `{result['features']}`, {result['num_rows']} rows, "
      f"{_percent(result['noise_rate'])} mislabeled; {full['num_train_verified']} verified "
      f"training and {full['num_val_verified']} verified validation rows; "
      f"{full['num_evaluated']} evaluated rows.", "", PROTOCOL, "",
      "| method | val error | error (unverified rows) | delta | seconds | peak RSS growth |",
      "|---|---|---|---|---|---|"]
  lines += [f"| {name} | {_percent(r['val_error'])} | {_percent(r['error'])} | "
            f"{r['delta']:.4g} | {r['seconds']:.1f} | {r['peak_rss_growth_mib']:.0f} MiB |"
            for name, r in full["methods"].items()]
  repeats = full.get("cleannet_repeat_errors", [])
  if len(repeats) > 1:
    lines.append(f"\nCleanNet over {len(repeats)} runs with seeds {result['seed']}.."
                 f"{result['seed'] + len(repeats) - 1} (same validation rows): error "
                 f"{_percent(np.mean(repeats))} ± {_percent(np.std(repeats))} (min "
                 f"{_percent(min(repeats))}, max {_percent(max(repeats))}); the table's "
                 "row is the first run, on which transfer and ablation build.")
  if not full["cleanlab_installed"]:
    lines.append("\ncleanlab was not installed: its row is missing.")
  if full["supervised_fallback_classes"]:
    lines.append("\nSupervised baselines fell back to a constant score for: "
                 + ", ".join(full["supervised_fallback_classes"]) + ".")
  if held_out_any(result["transfer"]):
    lines += ["", "Transfer: verification labels of n of the "
              f"{len(result['class_names'])} classes held out from CleanNet (and from "
              "the threshold choice of every method but the MLP, which keeps all "
              "labels); error on the held-out classes' unverified rows only, mean ± "
              f"standard deviation over {result['transfer_splits']} random class splits.",
              ""]
    names = list(next(iter(result["transfer"].values()))["mean"])
    lines += ["| n held out | " + " | ".join(names) + " |",
              "|---" * (len(names) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(
        f"{_percent(r['mean'][name])} ± {_percent(r['std'][name])}" for name in names) + " |"
              for n, r in result["transfer"].items()]
  if result.get("ablation"):
    n = result["ablation_transfer_n"]
    seeds = result["ablation_seeds"]
    over_seeds = (
        "" if seeds == 1 else
        f" Every variant is trained {seeds} times, with seeds {result['seed']}.."
        f"{result['seed'] + seeds - 1} (initial weights and batch order; the same validation "
        "rows and class splits), and each column is the mean ± standard deviation over "
        "those runs (transfer columns: over splits and seeds).")
    lines += ["", "Ablation: CleanNet variants on the same features, splits and protocol; "
              "each row changes the settings of the first row as listed. The two "
              "verified-rows columns are all a setting may be chosen on: the error on the "
              "verified validation rows (full supervision) and, with "
              f"{n} classes' verification labels held out, on those classes' verified rows "
              "(at the threshold chosen on the other classes' validation rows). The two "
              "evaluation columns are the error on all unverified rows (full supervision) "
              f"and on the held-out classes' unverified rows (transfer n={n}). Transfer "
              "columns are mean ± standard deviation over the splits above." + over_seeds, "",
              "| variant | CleanNet | changes | verified: val error | verified: held-out "
              f"classes n={n} | evaluation: error (unverified rows) | evaluation: transfer "
              f"n={n} |", "|---|---|---|---|---|---|---|"]
    variants = result["ablation"].values()
    for name, r in result["ablation"].items():
      changes = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "—"
      lines.append(f"| {name} | {r['description']} | {changes} | "
                   f"{_one_or_mean(r['val_error'])} | {_mean_and_std(r['held_out_verified'])} | "
                   f"{_one_or_mean(r['error'])} | {_mean_and_std(r['transfer'])} |")
    if len(variants) >= 3:
      full = _rank_correlation([np.mean(r["val_error"]) for r in variants],
                               [np.mean(r["error"]) for r in variants])
      agreement = [f"full supervision {full:.2f}"]
      if all(r["transfer"] for r in variants):
        held_out = _rank_correlation([np.mean(r["held_out_verified"]) for r in variants],
                                     [np.mean(r["transfer"]) for r in variants])
        agreement.append(f"transfer n={n} {held_out:.2f}")
      lines.append(f"\nHow well the verified rows stand in for the evaluation rows when "
                   f"choosing among these {len(variants)} variants: Spearman rank "
                   "correlation between the verified and the evaluation column, "
                   + ", ".join(agreement) + ".")
  return "\n".join(lines) + "\n"


def plot(transfer_report, path):
  """Fig. 5 analog as a PNG; skipped without matplotlib (a benchmark-only extra)."""
  pyplot = markdown_sections.pyplot("transfer plot")
  if pyplot is None:
    return
  ns = sorted(transfer_report)
  names = list(transfer_report[ns[0]]["mean"])
  figure, axes = pyplot.subplots(figsize=(6, 4))
  for name in names:
    axes.errorbar(ns, [100 * transfer_report[n]["mean"][name] for n in ns],
                  yerr=[100 * transfer_report[n]["std"][name] for n in ns],
                  marker="o", capsize=3, label=name)
  axes.set_xlabel("classes with verification labels held out (n)")
  axes.set_ylabel("average error on held-out classes (%)")
  axes.set_xticks(ns)
  axes.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=120)


def main(_):
  info, rows, truth = rows_with_truth(_default(FLAGS.features, "features", "all"),
                                      FLAGS.clean_labels)
  reference_sets = references.ReferenceSets.load(_default(FLAGS.references,
                                                          "references.npz"))
  out = _default(FLAGS.out, "detection_benchmark")
  os.makedirs(out, exist_ok=True)
  keys = rows["key"].astype(str)
  classifier_path = _default(FLAGS.classifier, "step1", classifier.CLASSIFIER_FILE)
  manifest = _default(FLAGS.manifest, "train.csv")

  def probabilities():
    return cnn_probabilities(classifier_path, manifest, info.class_names, keys)

  if FLAGS.cleannet_workers > 1:
    training.train_in_processes(cleannet_runs(rows, reference_sets, info, out),
                                FLAGS.cleannet_workers)

  full, scores = full_supervision(rows, truth, reference_sets, probabilities, info, out)
  result = {
      "command": "python -m tools.benchmark_detection " + shlex.join(sys.argv[1:]),
      "seed": FLAGS.seed, "cleannet_steps": FLAGS.cleannet_steps,
      "features": info.directory, "num_rows": info.num_rows,
      "class_names": list(info.class_names), "noise_rate": float(1 - truth.mean()),
      "transfer_splits": FLAGS.transfer_splits, "full": full,
      "transfer": transfer(rows, truth, reference_sets, scores, full["methods"], info, out)}
  if FLAGS.ablations:
    result["ablation_transfer_n"] = FLAGS.ablation_transfer_n
    result["ablation_seeds"] = FLAGS.ablation_seeds
    result["ablation"] = ablation(rows, truth, reference_sets, info, out)
  data.atomic_write_text(os.path.join(out, "detection_benchmark.json"),
                         json.dumps(result, indent=2) + "\n")
  if held_out_any(result["transfer"]):
    plot(result["transfer"], os.path.join(out, "transfer.png"))
  if FLAGS.benchmarks_md:
    markdown_sections.update_file(FLAGS.benchmarks_md, section_name(FLAGS.run_dir, FLAGS.section),
                                  markdown(result))
  print(markdown(result))


def run():
  common.run(main)


if __name__ == "__main__":
  run()
