"""The one command behind BENCHMARKS.md: every stage, every section, every figure.

  python -m tools.benchmarks --data=../shared/data/cifar10n [--out=runs/benchmarks]
  make benchmarks DATA=../shared/data/cifar10n

Runs each stage as its own process (``python -m tools.<tool>``), so that its
wall time and peak resident memory are its own, with stdout and stderr in
<out>/<job>.log:

* demo: tools.demo with the demo's settings (job ``demo``) and with the paper's
  losses (job ``demo-paper``);
* export: tools.benchmark_export;
* features: tools.cifar10n_features for each of --label_columns (job
  ``features-<label>``: step 1, feature extraction, reference sets);
* detection: tools.benchmark_detection on each of those feature runs (job
  ``detection-<label>``), and the --seeded_ablations against the defaults over
  --ablation_seeds seeds, full supervision and the ablation's transfer only
  (job ``ablation-seeds-<label>``);
* the features diagnostic: for each --features_diagnostic pair LABEL:OTHER, a
  features job ``features-LABEL-step1_OTHER`` (LABEL's noisy labels on the
  features of OTHER's step-1 network, tools.cifar10n_features --step1_from)
  and its detection job ``detection-LABEL-step1_OTHER`` (no ablations, one
  CleanNet run): the same detection problem on better features;
* classification: tools.cifar10n_classification on the feature run of
  --classification_label (its step 1, features and reference sets reused):
  fine-tuning step 1 with each weighting (job ``classification``), and
  training the SCRATCH_VARIANTS from scratch with step 1's recipe (job
  ``classification-scratch``); then, on the feature run of each of
  --classification_checks, the CHECK_VARIANTS from scratch (job
  ``classification-scratch-LABEL``): the weighting default on labels it was
  not chosen on. Those reuse the clean variant of ``classification-scratch``
  (--clean_from): the same step-1 recipe on the same clean labels.

Each tool writes its own section (its ``markdown(result)``) into
<out>/sections/<job>.md, given as its --benchmarks_md; the features sections
are written here from the JSON tools.cifar10n_features prints. A finished job
leaves <out>/<job>.json (written last, atomically): its command, wall time,
peak RSS, result and BENCHMARKS.md section. A rerun skips
every job whose JSON exists (and stops if that JSON was made by another
command), so an interrupted run resumes where it stopped. After every job the
orchestrator rewrites --benchmarks_md: the ``header`` section (this command,
the seed, the machine), one section per finished job, and the ``cost`` section
(every job's wall time and peak RSS); text outside the sections' markers is
left as it is, and a section not in the file yet goes after the one before it
(the header at the top, the cost at the end). Figures the stages draw (with
matplotlib, the ``benchmark`` extra) are copied to docs/benchmarks/ next to
--benchmarks_md and linked.
"""

import dataclasses
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time

from absl import flags
from absl import logging

from tools import common, markdown_sections
from cleannet_tf.errors import InputError

STAGES = ("demo", "export", "features", "detection", "classification")
CIFAR_STAGES = ("features", "detection", "classification")
LABEL_COLUMNS = ("worse_label", "aggre_label")
# The demo with the paper's and the release's settings where the library's
# defaults differ: training.PAPER_SETTINGS as flags (this module imports no
# TensorFlow; a test keeps the two equal).
PAPER_DEMO_ARGS = ("--standardize_features=false", "--query_hidden_dim=256",
                   "--embedding_dim=128", "--optimizer=sgd", "--learning_rate=0.01",
                   "--beta=0.1", "--cross_class_negatives=0", "--class_separation=0",
                   "--weight_averaging=0", "--threshold_rule=minimum",
                   "--threshold_tie_band=0",
                   "--gamma=0.1", "--pseudo_label_margin=0.1")
FIGURES_DIR = os.path.join("docs", "benchmarks")
# The classification variants trained from scratch: each is a whole step-1
# training (the longest job of the file), so the ones Table 3 compares, per-
# class balancing, w_soft entering the loss instead of drawing rows (the
# default's ablation; the other weightings in the loss are fine-tuned only),
# and the second round of Sec. 3.3's alternating scheme (w_soft of CleanNet*,
# which the job trains anyway for its detection figure).
SCRATCH_VARIANTS = ("none", "w_hard", "w_soft", "w_soft_balanced", "w_soft_loss",
                    "w_soft_star", "clean")
# The from-scratch check on the other label columns: w_soft drawn (the default)
# against w_soft in the loss, and w_hard drawn (the explicit removal of the
# flagged rows), between the unweighted noisy and clean labels.
CHECK_VARIANTS = ("none", "w_hard", "w_soft", "w_soft_loss", "clean")

flags.DEFINE_string("data", None,
                    "CIFAR-10N folder (train.csv, test.csv, classes.txt); needed by the "
                    "features, detection and classification stages.")
flags.DEFINE_string("out", os.path.join("runs", "benchmarks"),
                    "Folder for every stage's outputs, logs and result JSON; a rerun "
                    "skips the stages finished there.")
flags.DEFINE_string("benchmarks_md", "BENCHMARKS.md",
                    "Markdown file whose generated sections are rewritten.")
flags.DEFINE_integer("seed", 0, "Seed of every stage.")
flags.DEFINE_list("stages", list(STAGES), "Stages to run, of: " + ", ".join(STAGES) + ".")
flags.DEFINE_list("jobs", [],
                  "Only these jobs of --stages (names as in BENCHMARKS.md's cost table, e.g. "
                  "ablation-seeds-aggre_label), to regenerate some sections; empty: all.")
flags.DEFINE_list("label_columns", list(LABEL_COLUMNS),
                  "CIFAR-10N noisy label columns with a features and a detection job each.")
flags.DEFINE_string("classification_label", "worse_label",
                    "Label column whose feature run the classification stage uses.")
flags.DEFINE_list("classification_checks", ["aggre_label"],
                  "Label columns (of --label_columns, not --classification_label) on whose "
                  "feature run the from-scratch classification is repeated with "
                  f"{', '.join(CHECK_VARIANTS)} (job classification-scratch-<label>): the "
                  "weighting default checked on labels it was not chosen on. Empty: none.")
flags.DEFINE_list("features_diagnostic", ["worse_label:aggre_label"],
                  "LABEL:OTHER pairs: the features and detection stages also run on LABEL's "
                  "noisy labels with the features of OTHER's step-1 network (OTHER's labels "
                  "are less noisy, so its features are better): what better features are "
                  "worth. Both must be in --label_columns (the default pair is skipped "
                  "otherwise). Empty: none.")
flags.DEFINE_float("step1_epochs", 20.0, "Step-1 training epochs (tools.cifar10n_features "
                   "--epochs); 8 epochs left the features the cap on full supervision.")
flags.DEFINE_integer("cleannet_steps", None,
                     "CleanNet steps of the detection and classification stages; unset: "
                     "each tool's default.")
flags.DEFINE_integer("cleannet_repeats", 3, "tools.benchmark_detection --cleannet_repeats.")
flags.DEFINE_integer("cleannet_workers", 2,
                     "tools.benchmark_detection --cleannet_workers: CleanNet runs trained at "
                     "once (on 2 CPU cores two finish sooner than one after another; on a "
                     "GPU, 1).")
flags.DEFINE_list("transfer_n", ["0", "3", "5", "7"],
                  "tools.benchmark_detection --transfer_n.")
flags.DEFINE_integer("transfer_splits", 3, "tools.benchmark_detection --transfer_splits.")
flags.DEFINE_list("ablations", [],
                  "tools.benchmark_detection --ablations (CleanNet variants, or 'all'); "
                  "empty: none.")
flags.DEFINE_list("seeded_ablations", ["transfer_thresholds", "dropout", "paper_embeddings"],
                  "CleanNet variants (of --ablations' names) compared with the defaults over "
                  "--ablation_seeds seeds on each label column (job ablation-seeds-<label>): "
                  "those whose one-seed ablation rows are within run-to-run variation of the "
                  "defaults. Empty: no such job.")
flags.DEFINE_integer("ablation_seeds", 3,
                     "tools.benchmark_detection --ablation_seeds of the ablation-seeds jobs.",
                     lower_bound=1)
flags.DEFINE_integer("finetune_steps", None,
                     "tools.cifar10n_classification --finetune_steps; unset: its default.")
for _stage in STAGES:
  flags.DEFINE_string(f"{_stage}_args", "",
                      f"More flags for the {_stage} stage's tool, as one shell-quoted "
                      "string (e.g. \"--steps=100\").")
FLAGS = flags.FLAGS


@dataclasses.dataclass
class Job:
  """One process of a stage.

  Attributes:
    name: its log, result JSON and BENCHMARKS.md section are named after it.
    stage: the --stages entry that runs it.
    module: the tool, run as ``python -m <module> <args>``.
    args: the tool's flags.
    output_dir: the folder it works in; existing before the run = resumed.
    result_file: the JSON the tool leaves; None: the JSON it prints last.
    section_file: the Markdown file the tool writes its section into; None:
      this module writes the section.
    sections: names the tool may give its section, the first preferred.
    figure: the PNG the tool draws, if any, and its caption.
    needs: jobs whose outputs it reads.
    parts: (name, path) of work the tool skips when the path exists.
    started_parts: (name, path) of work that an earlier run began when the
      path exists (a checkpoint) and the part is not finished: the tool
      resumes it, so its time and rate are not those of the whole part.
  """
  name: str
  stage: str
  module: str
  args: list
  output_dir: str
  result_file: str | None = None
  section_file: str | None = None
  sections: tuple = ()
  figure: tuple | None = None
  needs: tuple = ()
  parts: tuple = ()
  started_parts: tuple = ()

  @property
  def command(self):
    return shlex.join(["python", "-m", self.module, *self.args])


def _extra_args(stage, reserved):
  """The stage's --<stage>_args, refusing flags that this module sets itself."""
  name = f"{stage}_args"
  try:
    args = shlex.split(FLAGS[name].value)
  except ValueError as error:
    raise InputError(f"--{name}: {error}") from None
  for arg in args:
    flag = arg.lstrip("-").split("=", 1)[0]
    if not arg.startswith("--"):
      raise InputError(f"--{name}: {arg!r} is not a flag (flags start with --)")
    if flag in reserved:
      raise InputError(f"--{name}: --{flag} is set by tools.benchmarks; use its own flag")
  return args


def features_diagnostic_pairs():
  """(label, other) pairs of --features_diagnostic to run: both in --label_columns."""
  pairs = []
  for entry in FLAGS.features_diagnostic:
    label, _, other = entry.partition(":")
    if label not in LABEL_COLUMNS or other not in LABEL_COLUMNS or label == other:
      raise InputError(f"--features_diagnostic: {entry!r} is not LABEL:OTHER, two distinct "
                       f"columns of: {', '.join(LABEL_COLUMNS)}")
    if label in FLAGS.label_columns and other in FLAGS.label_columns:
      pairs.append((label, other))
    elif FLAGS["features_diagnostic"].present:
      raise InputError(f"--features_diagnostic: {entry!r} needs both columns in "
                       f"--label_columns ({','.join(FLAGS.label_columns)})")
  return pairs


def classification_checks():
  """The label columns of --classification_checks to run.

  A column runs when it is in --label_columns and is not
  --classification_label; otherwise a default column is skipped and a given
  one refused.
  """
  checks = []
  for label in FLAGS.classification_checks:
    if label not in LABEL_COLUMNS:
      raise InputError(f"--classification_checks: {label!r} is not a column of "
                       f"{', '.join(LABEL_COLUMNS)}")
    if label in FLAGS.label_columns and label != FLAGS.classification_label:
      checks.append(label)
    elif FLAGS["classification_checks"].present:
      raise InputError(f"--classification_checks: {label!r} must be in --label_columns "
                       f"({','.join(FLAGS.label_columns)}) and not --classification_label")
  return checks


def plan(out, data_dir):
  """Every job of every stage, in the order they run (and their sections appear).

  Without `data_dir`, the CIFAR-10N stages have no jobs.
  """
  sections = os.path.join(out, "sections")

  def path(*parts):
    return os.path.join(out, *parts)

  jobs = []
  demo_extra = _extra_args("demo", {"work_dir", "seed", "benchmarks_md", "benchmarks_section"})
  for name, variant in [("demo", ()), ("demo-paper", PAPER_DEMO_ARGS)]:
    jobs.append(Job(
        name, "demo", "tools.demo",
        [f"--work_dir={path(name)}", f"--seed={FLAGS.seed}", *variant, *demo_extra,
         f"--benchmarks_md={os.path.join(sections, name + '.md')}",
         f"--benchmarks_section={name}"],
        path(name), result_file=path(name, "demo_results.json"),
        section_file=os.path.join(sections, name + ".md"), sections=(name,),
        figure=(path(name, "demo.png"), "Digits demo: naive against CleanNet")
        if name == "demo" else None))
  jobs.append(Job(
      "export", "export", "tools.benchmark_export",
      [f"--out={path('export')}", f"--seed={FLAGS.seed}",
       *_extra_args("export", {"out", "seed", "benchmarks_md"}),
       f"--benchmarks_md={os.path.join(sections, 'export.md')}"],
      path("export"), result_file=path("export", "export_benchmark.json"),
      section_file=os.path.join(sections, "export.md"), sections=("export",),
      figure=(path("export", "export.png"), "Scoring throughput against batch size")))
  if not data_dir:
    return jobs
  features_extra = _extra_args("features", {"data", "out", "label_column", "epochs", "seed",
                                            "step1_from"})
  detection_extra = _extra_args("detection", {
      "run_dir", "clean_labels", "out", "benchmarks_md", "cleannet_steps", "transfer_n",
      "transfer_splits", "seed", "ablations", "cleannet_repeats", "cleannet_workers",
      "section", "ablation_seeds"})
  ablations = [f"--ablations={','.join(FLAGS.ablations)}"] if FLAGS.ablations else []
  cleannet_steps = ([] if FLAGS.cleannet_steps is None
                    else [f"--cleannet_steps={FLAGS.cleannet_steps}"])

  def features_job(name, label, *extra, needs=()):
    features = path(name)
    return Job(
        name, "features", "tools.cifar10n_features",
        [f"--data={data_dir}", f"--out={features}", f"--label_column={label}",
         f"--epochs={FLAGS.step1_epochs:g}", f"--seed={FLAGS.seed}", *extra, *features_extra],
        features, parts=(("step 1", os.path.join(features, "step1", "summary.json")),
                         ("feature extraction",
                          os.path.join(features, "features", "all", "metadata.json")),
                         ("reference sets", os.path.join(features, "references.npz"))),
        started_parts=(("step 1", os.path.join(features, "step1", "checkpoints")),),
        needs=needs)

  def detection_job(name, features_job_name, caption, ablation_args, repeats, *extra,
                    transfer_n=tuple(FLAGS.transfer_n)):
    return Job(
        name, "detection", "tools.benchmark_detection",
        [f"--run_dir={path(features_job_name)}",
         f"--clean_labels={os.path.join(data_dir, 'train.csv')}", f"--out={path(name)}",
         *cleannet_steps, f"--transfer_n={','.join(transfer_n)}",
         f"--transfer_splits={FLAGS.transfer_splits}", *ablation_args, f"--seed={FLAGS.seed}",
         f"--cleannet_repeats={repeats}", f"--cleannet_workers={FLAGS.cleannet_workers}",
         *extra, *detection_extra,
         f"--benchmarks_md={os.path.join(sections, name + '.md')}"],
        path(name), result_file=path(name, "detection_benchmark.json"),
        section_file=os.path.join(sections, name + ".md"),
        # tools.benchmark_detection named its section "detection" before it
        # named it per label column.
        sections=(name, "detection"),
        figure=(path(name, "transfer.png"), f"Transfer: error on held-out classes ({caption})"),
        needs=(features_job_name,))

  for label in FLAGS.label_columns:
    jobs.append(features_job(f"features-{label}", label))
    jobs.append(detection_job(f"detection-{label}", f"features-{label}", label, ablations,
                              FLAGS.cleannet_repeats))
    if FLAGS.seeded_ablations:
      # Full supervision and the ablation's transfer only: no transfer table.
      jobs.append(detection_job(
          f"ablation-seeds-{label}", f"features-{label}", label,
          [f"--ablations={','.join(FLAGS.seeded_ablations)}",
           f"--ablation_seeds={FLAGS.ablation_seeds}"], FLAGS.ablation_seeds,
          f"--section=ablation-seeds-{label}", transfer_n=("0",)))
  for label, other in features_diagnostic_pairs():
    suffix = f"{label}-step1_{other}"
    jobs.append(features_job(f"features-{suffix}", label,
                             f"--step1_from={path(f'features-{other}', 'step1')}",
                             needs=(f"features-{other}",)))
    jobs.append(detection_job(f"detection-{suffix}", f"features-{suffix}",
                              f"{label}, features of the {other} step 1", [], 1,
                              f"--section=detection-{suffix}"))
  finetune_steps = ([] if FLAGS.finetune_steps is None
                    else [f"--finetune_steps={FLAGS.finetune_steps}"])
  classification_extra = _extra_args("classification", {
      "data", "out", "cleannet_steps", "finetune_steps", "seed", "benchmarks_md",
      "from_scratch", "variants", "clean_from"})
  # (job, label column, the tool's own section and work folder name, its
  # fine-tuning steps, its from-scratch flags, caption, jobs it reads besides
  # its feature run)
  classification_jobs = [
      ("classification", FLAGS.classification_label, "classification", finetune_steps, [],
       "each fine-tuning variant", ()),
      ("classification-scratch", FLAGS.classification_label, "classification-scratch", [],
       ["--from_scratch", f"--variants={','.join(SCRATCH_VARIANTS)}"],
       "each variant trained from scratch", ())]
  classification_jobs += [
      (f"classification-scratch-{label}", label, "classification-scratch", [],
       ["--from_scratch", f"--variants={','.join(CHECK_VARIANTS)}",
        f"--clean_from={path(f'features-{FLAGS.classification_label}')}"],
       f"each variant trained from scratch on {label}", ("classification-scratch",))
      for label in classification_checks()]
  for name, label, tool_section, steps, mode, caption, reads in classification_jobs:
    features = path(f"features-{label}")
    work = os.path.join(features, tool_section)
    jobs.append(Job(
        name, "classification", "tools.cifar10n_classification",
        [f"--data={data_dir}", f"--out={features}", *cleannet_steps, *steps,
         f"--seed={FLAGS.seed}", *mode, *classification_extra,
         f"--benchmarks_md={os.path.join(sections, name + '.md')}"],
        work, result_file=os.path.join(work, "results.json"),
        section_file=os.path.join(sections, name + ".md"), sections=(tool_section,),
        figure=(os.path.join(work, "top1.png"), f"CIFAR-10N test top-1 of {caption}"),
        needs=(f"features-{label}", *reads)))
  return jobs


def benchmarks_command():
  """This module's command line with the flags that shape the numbers."""
  args = []
  for name in ("data", "out", "seed", "label_columns", "features_diagnostic",
               "classification_label", "classification_checks", "step1_epochs",
               "cleannet_steps", "cleannet_repeats",
               "cleannet_workers", "transfer_n", "transfer_splits",
               "ablations", "seeded_ablations", "ablation_seeds", "finetune_steps",
               *(f"{stage}_args" for stage in STAGES)):
    flag = FLAGS[name]
    if name in ("data", "seed") or flag.value != flag.default:
      if flag.value is not None:
        args.append(f"--{name}={flag.serialize().split('=', 1)[1]}")
  return shlex.join(["python", "-m", "tools.benchmarks", *args])


def machine():
  """A one-line description of this machine."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  model, memory = platform.processor() or platform.machine(), None
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      model = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), model)
    with open("/proc/meminfo", encoding="utf-8") as f:
      memory = next((int(line.split()[1]) / 2**20 for line in f
                     if line.startswith("MemTotal")), None)
  except OSError:
    pass
  gpus = []
  if shutil.which("nvidia-smi"):
    listing = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, check=False)
    gpus = [line.strip() for line in listing.stdout.splitlines() if line.strip()]
  return (f"{cores} CPU cores ({model})"
          + (f", {memory:.0f} GiB memory" if memory else "")
          + (", GPU: " + ", ".join(gpus) if gpus else ", no GPU"))


def _last_json(text, where):
  """The last JSON object printed (indented, starting on its own line) in `text`."""
  decoder = json.JSONDecoder()
  start = len(text)
  while (start := text.rfind("{\n", 0, start)) >= 0:
    if start == 0 or text[start - 1] == "\n":
      try:
        return decoder.raw_decode(text, start)[0]
      except json.JSONDecodeError:
        pass
  raise InputError(f"{where}: no JSON result in its output")


def run_job(job, out):
  """Runs `job` as a process; returns its record. InputError naming its log on failure."""
  log_path = os.path.join(out, f"{job.name}.log")
  if job.section_file and os.path.exists(job.section_file):
    os.remove(job.section_file)
  resumed = os.path.exists(job.output_dir)
  finished_before = [name for name, path in job.parts if os.path.exists(path)]
  started_before = [name for name, path in job.started_parts
                    if os.path.exists(path) and name not in finished_before]
  print(f"{job.name}: {job.command}\n  log: {log_path}", flush=True)
  with open(log_path, "w", encoding="utf-8") as log:
    log.write(f"$ {job.command}\n")
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  started = time.monotonic()
  stdout = []
  with open(log_path, "a", encoding="utf-8") as log:
    process = subprocess.Popen([sys.executable, "-m", job.module, *job.args],
                               stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
      for line in process.stdout:
        stdout.append(line)
        log.write(line)
        log.flush()
      _, status, usage = os.wait4(process.pid, 0)
    except BaseException:
      process.kill()
      process.wait()
      raise
    process.returncode = os.waitstatus_to_exitcode(status)
  seconds = time.monotonic() - started
  if process.returncode != 0:
    raise InputError(f"stage {job.name} failed (exit status {process.returncode}); "
                     f"see {log_path}")
  if job.result_file:
    with open(job.result_file, encoding="utf-8") as f:
      result = json.load(f)
  else:
    result = _last_json("".join(stdout), log_path)
  if job.name.startswith("features-"):
    result["finished_before"] = finished_before
    result["started_before"] = started_before
  section = None
  if job.section_file:
    text = markdown_sections.read_text(job.section_file)
    section = next((found for name in job.sections
                    if (found := markdown_sections.extract_section(text, name)) is not None),
                   None)
    if section is None:
      raise InputError(f"stage {job.name} wrote no section named {job.sections[0]} to "
                       f"{job.section_file}; see {log_path}")
  return {"name": job.name, "stage": job.stage, "command": job.command, "args": job.args,
          "seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024, "resumed": resumed,
          "machine": machine(), "result": result, "section": section,
          "figure": job.figure[0] if job.figure and os.path.exists(job.figure[0]) else None}


def _atomic_write(path, text):
  # Imported here: cleannet_tf.data imports TensorFlow, which this process
  # needs for nothing else (it only starts the stages' processes).
  from cleannet_tf import data  # pylint: disable=g-import-not-at-top
  data.atomic_write_text(path, text)


def _record_path(out, job):
  return os.path.join(out, f"{job.name}.json")


def read_record(out, job):
  """The record of a finished job, or None."""
  path = _record_path(out, job)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _percent(value):
  return f"{100 * value:.2f}%"


def features_markdown(job, result, epochs):
  """The section of a features job, from the JSON tools.cifar10n_features prints."""
  label = next(arg.split("=", 1)[1] for arg in job.args
               if arg.startswith("--label_column="))
  # As the command gave it (the result has it absolute, which names this machine).
  reused = result.get("step1_from") and next(
      arg.split("=", 1)[1] for arg in job.args if arg.startswith("--step1_from="))
  skipped = set(result.get("finished_before", []))
  started = set(result.get("started_before", []))
  rows = result["feature_rows"]
  try:
    import numpy as np  # pylint: disable=g-import-not-at-top
    with np.load(result["references"]) as saved:
      k = f"K={saved['features'].shape[1]}"
  except (OSError, KeyError, ValueError):
    k = "K"

  def timed(part, seconds, text):
    if part in skipped:
      return "finished by an earlier run (not timed)"
    if part in started:  # only what was left after the checkpoint: no rate to give
      return "resumed from an earlier run's checkpoint (not timed)"
    return text(seconds)

  step1_row = (f"| step 1: reused from `{reused}`, test top-1 measured again | "
               + timed("step 1", result["step1_seconds"], lambda s: f"{s:,.0f} s") + " | |"
               if reused else
               f"| step 1: training, {epochs:g} epochs | "
               + timed("step 1", result["step1_seconds"], lambda s: f"{s:,.0f} s")
               + " | " + timed("step 1", result["step1_seconds"],
                               lambda s: f"{epochs * rows / s:,.0f} images/s") + " |")
  table = [
      "| step | time | throughput |", "|---|---|---|", step1_row,
      f"| feature extraction, {rows:,} images | "
      + timed("feature extraction", result["extraction_seconds"], lambda s: f"{s:,.1f} s")
      + " | " + timed("feature extraction", result["extraction_seconds"],
                      lambda s: f"{rows / s:,.0f} images/s") + " |",
      f"| K-means reference sets ({k} per class) | "
      + timed("reference sets", result["references_seconds_per_class"],
              lambda s: f"{s:,.1f} s per class") + " | |"]
  step1 = (f"Step 1 is not trained on them: the small ResNet of `{reused}`, trained on "
           "another label column of the same images, gives the features (a diagnostic of "
           "what better features are worth, not a method: that network saw other labels "
           "of these images). It reaches"
           if reused else "Step 1, the small ResNet trained on them, reaches")
  lines = [
      f"## CIFAR-10N features with `{label}` noisy labels"
      + (" from another step-1 network" if reused else ""),
      f"Command: `{job.command}` (seed {FLAGS.seed}).",
      f"Noisy labels `{label}`: {_percent(result['noise_rate'])} of the "
      f"{rows:,} training images mislabeled. {step1} test top-1 "
      f"{_percent(result['step1_test_top1'])} on the clean test "
      f"images; its {result['dim']}-d features of every training image "
      f"(`{result['features']}`) and the reference sets are the input of the detection "
      "section below.", "", *table]
  return "\n".join(lines) + "\n"


def _duration(seconds):
  if seconds < 120:
    return f"{seconds:.0f} s"
  if seconds < 7200:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.2f} h"


def _memory(mib):
  return f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"


def cost_markdown(jobs, records):
  """The table of every finished job's wall time and peak RSS."""
  done = [(job, records[job.name]) for job in jobs if job.name in records]
  machines = sorted({record["machine"] for _, record in done})
  lines = [
      "## Cost of reproducing this file",
      "Each stage runs as its own process; wall time and peak resident memory (the "
      "process's maximum RSS from `wait4`) of each"
      + (f", on {machines[0]}" if len(machines) == 1 else "") + ":", "",
      "| stage | wall time | peak RSS |" + (" machine |" if len(machines) > 1 else ""),
      "|---|---|---|" + ("---|" if len(machines) > 1 else "")]
  for job, record in done:
    note = " (resumed: work finished earlier not timed)" if record["resumed"] else ""
    lines.append(f"| {job.name}{note} | {_duration(record['seconds'])} | "
                 f"{_memory(record['peak_rss_mib'])} |"
                 + (f" {record['machine']} |" if len(machines) > 1 else ""))
  if done:
    # A resumed stage's time is its last run's only, so then is the sum.
    total = ("all (resumed stages: their last run only)"
             if any(r["resumed"] for _, r in done) else "all")
    lines.append(f"| {total} | {_duration(sum(r['seconds'] for _, r in done))} | "
                 f"{_memory(max(r['peak_rss_mib'] for _, r in done))} (largest) |"
                 + (" |" if len(machines) > 1 else ""))
  missing = [job.name for job in jobs if job.name not in records]
  if missing:
    lines += ["", "Not run yet: " + ", ".join(missing) + "."]
  return "\n".join(lines) + "\n"


def header_markdown(records):
  machines = sorted({record["machine"] for record in records.values()}) or [machine()]
  return "\n".join([
      "# Benchmarks",
      "",
      "Every number, table and figure between the generated-section markers of this "
      "file is written by one command (seed "
      f"{FLAGS.seed}), which runs every stage below and rewrites these sections:",
      "```",
      benchmarks_command(),
      "```",
      "(`make benchmarks DATA=<CIFAR-10N folder>` runs it with the default flags). Each "
      "section names the command of its own stage, seed included; the last section gives "
      "each stage's cost. Machine: " + "; ".join(machines) + "."]) + "\n"


def insert_missing(text, names):
  """`text` with empty markers for each missing section of `names`.

  A missing section goes right after the nearest earlier section of `names`
  present in `text`, else at the end: the order of `names` is kept.
  """
  for i, name in enumerate(names):
    if markdown_sections.extract_section(text, name) is not None:
      continue
    begin, end = markdown_sections.markers(name)
    previous = next((names[j] for j in range(i - 1, -1, -1)
                     if markdown_sections.extract_section(text, names[j]) is not None), None)
    if previous is None:
      text = markdown_sections.replace_section(text, name, "")
      continue
    previous_begin, previous_end = markdown_sections.markers(previous)
    line_end = text.find("\n", text.find(previous_end, text.find(previous_begin)))
    at = len(text) if line_end < 0 else line_end + 1
    text = f"{text[:at]}\n{begin}\n{end}\n{text[at:]}"
  return text


def write_markdown(path, jobs, records):
  """Rewrites the header, every finished job's section and the cost section."""
  text = markdown_sections.read_text(path)
  begin, end = markdown_sections.markers("header")
  if begin not in text:
    text = f"{begin}\n{end}\n" + (f"\n{text}" if text else "")
  # Missing sections go after the one before them; a missing cost section at the end.
  text = insert_missing(text, ["header", *(job.name for job in jobs if job.name in records)])
  text = markdown_sections.replace_section(text, "header", header_markdown(records))
  figures = os.path.join(os.path.dirname(os.path.abspath(path)), FIGURES_DIR)
  for job in jobs:
    record = records.get(job.name)
    if record is None:
      continue
    section = record["section"]
    if record["figure"] and os.path.exists(record["figure"]):
      os.makedirs(figures, exist_ok=True)
      target = os.path.join(figures, f"{job.name}.png")
      shutil.copyfile(record["figure"], target)
      link = os.path.relpath(target, os.path.dirname(os.path.abspath(path)))
      section += f"\n![{job.figure[1]}]({link.replace(os.sep, '/')})\n"
    text = markdown_sections.replace_section(text, job.name, section)
  text = markdown_sections.replace_section(text, "cost", cost_markdown(jobs, records))
  _atomic_write(path, text)


def _check_inputs(stages):
  if not stages:
    raise InputError("--stages: empty")
  unknown = [stage for stage in stages if stage not in STAGES]
  if unknown:
    raise InputError(f"--stages: unknown stage {unknown[0]!r} (stages: {', '.join(STAGES)})")
  if not FLAGS.label_columns:
    raise InputError("--label_columns: empty")
  unknown = [label for label in FLAGS.label_columns if label not in LABEL_COLUMNS]
  if unknown or len(set(FLAGS.label_columns)) != len(FLAGS.label_columns):
    raise InputError(f"--label_columns: {','.join(FLAGS.label_columns)!r} is not a list of "
                     f"distinct columns of: {', '.join(LABEL_COLUMNS)}")
  features_diagnostic_pairs()
  if "classification" in stages and FLAGS.classification_label not in FLAGS.label_columns:
    raise InputError(f"--classification_label: {FLAGS.classification_label!r} is not "
                     "among --label_columns")
  if "classification" in stages:
    classification_checks()
  if not FLAGS.benchmarks_md:
    raise InputError("--benchmarks_md: empty")
  if not set(stages) & set(CIFAR_STAGES):
    return
  if not FLAGS.data:
    raise InputError("--data: the CIFAR-10N folder is needed by the stages "
                     + ", ".join(s for s in stages if s in CIFAR_STAGES))
  for name in ("train.csv", "test.csv", "classes.txt"):
    if not os.path.isfile(os.path.join(FLAGS.data, name)):
      raise InputError(f"--data: {os.path.join(FLAGS.data, name)} not found")
  with open(os.path.join(FLAGS.data, "train.csv"), encoding="utf-8") as f:
    header = f.readline().strip().split(",")
  missing = [c for c in ("path", "clean_label", *FLAGS.label_columns) if c not in header]
  if missing:
    raise InputError(f"{os.path.join(FLAGS.data, 'train.csv')}: no column {missing[0]}")


def main(_):
  stages = [stage.strip() for stage in FLAGS.stages if stage.strip()]
  _check_inputs(stages)
  out = FLAGS.out
  jobs = plan(out, FLAGS.data)
  by_name = {job.name: job for job in jobs}
  os.makedirs(os.path.join(out, "sections"), exist_ok=True)
  records = {}
  for job in jobs:  # finished jobs of the same command, requested or not
    record = read_record(out, job)
    if record is not None and record["args"] == job.args:
      records[job.name] = record
    elif record is not None and job.stage in stages:
      raise InputError(
          f"{_record_path(out, job)}: stage {job.name} finished with another command "
          f"({record['command']}); delete that file and {job.output_dir} to rerun it, or "
          "use another --out")
    elif record is not None:
      logging.warning("%s: made by another command; its section is not written",
                      _record_path(out, job))
  unknown = sorted(set(FLAGS.jobs) - set(by_name))
  if unknown:
    raise InputError(f"--jobs: no job {unknown[0]!r} in this plan; its jobs: "
                     + ", ".join(by_name))
  selected = [job for job in jobs
              if job.stage in stages and (not FLAGS.jobs or job.name in FLAGS.jobs)]
  for job in selected:
    if job.name in records:
      print(f"{job.name}: finished earlier ({_record_path(out, job)}); skipped", flush=True)
      continue
    missing = [need for need in job.needs if need not in records]
    if missing:
      raise InputError(f"stage {job.name} needs {missing[0]}, which has not run in {out}; "
                       f"add {by_name[missing[0]].stage} to --stages")
    record = run_job(job, out)
    if record["section"] is None:
      record["section"] = features_markdown(job, record["result"], FLAGS.step1_epochs)
    _atomic_write(_record_path(out, job), json.dumps(record, indent=2) + "\n")
    records[job.name] = record
    print(f"{job.name}: done in {_duration(record['seconds'])}, peak RSS "
          f"{_memory(record['peak_rss_mib'])}", flush=True)
    write_markdown(FLAGS.benchmarks_md, jobs, records)
  write_markdown(FLAGS.benchmarks_md, jobs, records)
  print(f"{FLAGS.benchmarks_md}: sections header, "
        + ", ".join(name for name in by_name if name in records) + ", cost", flush=True)


def run():
  common.run(main)


if __name__ == "__main__":
  run()
