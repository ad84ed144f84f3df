"""The README's first command: CleanNet end to end on the embedded digits data.

scikit-learn's digits with ~30% class-dependent label noise, verification
labels on ~10% of the images in half of the classes, and features from a
small classifier trained on the noisy labels (step 1). Trains CleanNet with
the library's training loop, scores every image, and prints the average
per-class error of naive (keep every label) and CleanNet on the rows that had
no verification label, for classes with and without verification labels.

  python -m tools.demo [--work_dir=runs/demo] [--steps=...] [--benchmarks_md=BENCHMARKS.md]

Writes <work_dir>/demo_results.json and <work_dir>/demo.png (with matplotlib);
with --benchmarks_md, regenerates that file's section named --benchmarks_section
(``demo``; a run with other training settings than the demo's describes itself
as a variant, e.g. ``demo-paper`` for the paper's settings).
"""

import json
import os
import shlex
import sys
import time

from absl import flags

from tools import cleannet_flags, common, markdown_sections
from cleannet_tf import (data, demo_data, distribute, evaluation, losses, references,
                         scoring, training)

flags.DEFINE_string("work_dir", os.path.join("runs", "demo"),
                    "Where the demo writes features, reference sets and the model. "
                    "A rerun resumes; delete it to start afresh (needed after "
                    "changing settings or upgrading the library).")
flags.DEFINE_string("benchmarks_md", "",
                    "Markdown file whose --benchmarks_section is regenerated; empty: none.")
flags.DEFINE_string("benchmarks_section", "demo", "Name of that section's markers.")
FLAGS = flags.FLAGS

# The demo's scale: 1,797 tiny images train in seconds, not the release's 60k
# steps, and ~180 images per class make 5 K-means references (not 50). Every
# other flag keeps the library default.
DEMO_DEFAULTS = dict(steps=1500, eval_every=100, checkpoint_every=500, log_every=500,
                     lr_decay_steps=1000, num_references=5)


def uses_paper_settings(model_options, config):
  """Whether model options and a ``TrainConfig`` have ``training.PAPER_SETTINGS``."""
  paper_options, paper_config = training.with_overrides(model_options, config,
                                                        training.PAPER_SETTINGS)
  return paper_options == model_options and paper_config == config


def run_demo(work_dir, model_options, train_config, strategy=None):
  """Runs the demo in `work_dir` (resuming) and returns its result dict.

  Args:
    work_dir: folder for the features, the model and its checkpoints.
    model_options: ``CleanNet`` keyword arguments but num_classes and
      feature_dim; its num_references is also the K of the K-means references.
    train_config: ``training.TrainConfig``; its seed also draws the demo data.
    strategy: a ``tf.distribute`` strategy; None: the default.

  Returns:
    A JSON-ready dict: the data set's description, the chosen threshold and
    best step, and ``errors``, ``evaluation.naive_and_cleannet_errors`` on the
    rows without verification labels.
  """
  started = time.time()
  seed = train_config.seed
  demo = demo_data.make_digits_demo(seed=seed)
  info = demo.feature_set(os.path.join(work_dir, "features"))
  rows = data.load_arrays(info, verification="all")
  reference_sets = references.build_kmeans_references(
      rows["features"], rows["class_id"], info.num_classes,
      k=model_options["num_references"], seed=seed)
  model_config = dict(model_options, num_classes=info.num_classes, feature_dim=info.dim)
  trainer = training.Trainer(model_config, reference_sets, info,
                             os.path.join(work_dir, "cleannet"), train_config, strategy)
  result = trainer.train()

  # Evaluate on every row that carried no verification label: CleanNet never
  # saw its truth, in verified and in unverified classes alike.
  scores = scoring.Scorer(result.model).score(demo.features, demo.noisy_labels)
  held_out = demo.verification < 0
  truth = (demo.noisy_labels == demo.clean_labels).astype(int)
  delta = float(result.model.delta.numpy())
  thresholds = scoring.class_thresholds(result.model)
  report = evaluation.naive_and_cleannet_errors(
      demo.noisy_labels[held_out], truth[held_out], scores[held_out],
      thresholds[demo.noisy_labels[held_out]], demo.verified_classes)
  return {"delta": delta, "errors": report, "seconds": time.time() - started,
          "seed": seed, "best_step": int(result.best_step),
          "num_images": len(demo.keys), "num_classes": len(demo.class_names),
          "noise_rate": float(demo.noise_rate),
          "num_verified": int((demo.verification >= 0).sum()),
          "verified_classes": demo.verified_classes.tolist(),
          "classifier_noisy_accuracy": float(demo.classifier_noisy_accuracy),
          "paper_settings": uses_paper_settings(model_options, train_config)}


def _value(value):
  return f"{value:g}" if isinstance(value, float) else str(value)


def markdown(result):
  """The BENCHMARKS.md section of a demo result (with "command" and "settings")."""
  changed = result["changed"]
  table = ["| classes | rows | naive | CleanNet |", "|---|---|---|---|"]
  table += [f"| {group} | {row['rows']} | {row['naive']:.1%} | {row['cleannet']:.1%} |"
            for group, row in result["errors"].items()]
  run = (f"seed {result['seed']}; {result['settings']['steps']} CleanNet steps, best "
         f"step {result['best_step']}, threshold {result['delta']:.3f} chosen on "
         "held-out verified rows")
  differs = ", ".join(f"`--{name}={_value(value)}`" for name, value in changed.items())
  if result["paper_settings"]:
    lines = ["### The same demo with the paper's and release's settings",
             f"Command: `{result['command']}` ({run}); it differs from the demo in "
             f"{differs}. Average per-class error on the rows without verification "
             "labels:", "", *table]
  else:
    lines = [
        "## Label-noise detection on the embedded demo data",
        f"Command: `{result['command']}` ({run}).",
        "Average per-class error on the rows without verification labels "
        f"(scikit-learn digits: {result['num_images']} images, "
        f"{result['noise_rate']:.1%} class-dependent label noise, "
        f"{result['num_verified']} verification labels in "
        f"{len(result['verified_classes'])} of {result['num_classes']} classes; "
        "the features come from a step-1 classifier that reaches "
        f"{result['classifier_noisy_accuracy']:.1%} on its noisy labels):", "", *table, "",
        "CleanNet uses the library's defaults, which differ from the paper's in "
        + ", ".join(f"`--{name}`" for name in training.PAPER_SETTINGS)
        + " (see the CIFAR-10N ablation below)."]
    if changed:
      lines.append(f"This run differs from the demo's defaults in {differs}.")
  return "\n".join(lines) + "\n"


def plot(result, path):
  """Naive against CleanNet per group of classes, as a PNG (needs matplotlib)."""
  plt = markdown_sections.pyplot("demo plot")
  if plt is None:
    return None
  groups = list(result["errors"])
  figure, axes = plt.subplots(figsize=(6, 3.5))
  for offset, (method, label) in enumerate([("naive", "naive"), ("cleannet", "CleanNet")]):
    axes.bar([i + 0.4 * offset - 0.2 for i in range(len(groups))],
             [100 * result["errors"][group][method] for group in groups], 0.4, label=label)
  axes.set_xticks(range(len(groups)), groups)
  axes.set_ylabel("average per-class error (%)")
  axes.set_title("Digits demo: rows without verification labels")
  axes.set_ylim(0, 1.3 * axes.get_ylim()[1])  # room for the legend above the bars
  axes.legend(loc="upper right", ncols=2)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)
  return path


def main(_):
  model_options = cleannet_flags.model_config(0, 0)
  del model_options["num_classes"], model_options["feature_dim"]
  result = run_demo(FLAGS.work_dir, model_options, cleannet_flags.train_config(),
                    distribute.make_strategy(FLAGS.strategy))
  result["command"] = "python -m tools.demo " + shlex.join(sys.argv[1:])
  result["settings"] = {name: FLAGS[name].value
                        for name in [*DEMO_DEFAULTS, *training.PAPER_SETTINGS]}
  # Flags given on the command line, beyond DEMO_DEFAULTS' own defaults.
  result["changed"] = {name: FLAGS[name].value for name in result["settings"]
                       if FLAGS[name].present}

  print(f"\nCleanNet demo on scikit-learn digits: {result['num_images']} images, "
        f"{result['noise_rate']:.1%} noisy labels, {result['num_verified']} "
        f"verification labels in classes {result['verified_classes']}")
  print("step-1 classifier accuracy on its noisy labels: "
        f"{result['classifier_noisy_accuracy']:.1%}")
  print(f"delta (chosen on held-out verified rows): {result['delta']:.3f}; "
        f"best step {result['best_step']}")
  print("average per-class error on rows without verification labels:")
  print(f"  {'classes':<20}{'rows':>6}{'naive':>9}{'CleanNet':>10}")
  for group, row in result["errors"].items():
    print(f"  {group:<20}{row['rows']:>6}{row['naive']:>9.1%}{row['cleannet']:>10.1%}")
  print(f"time: {result['seconds']:.0f} s")
  data.atomic_write_text(os.path.join(FLAGS.work_dir, "demo_results.json"),
                         json.dumps(result, indent=2) + "\n")
  plot(result, os.path.join(FLAGS.work_dir, "demo.png"))
  if FLAGS.benchmarks_md:
    markdown_sections.update_file(FLAGS.benchmarks_md, FLAGS.benchmarks_section,
                                  markdown(result))


def run():
  for name, value in DEMO_DEFAULTS.items():
    FLAGS.set_default(name, value)
  common.run(main)


if __name__ == "__main__":
  run()
