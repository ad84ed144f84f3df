"""Carries a BENCHMARKS.md regeneration from one machine to the next.

  python docs/experiments/regeneration.py save [--out=runs/benchmarks]
  python docs/experiments/regeneration.py restore [--out=runs/benchmarks]

(from the repository root, with the project's .venv active).

`make benchmarks` with a 20-epoch step 1 takes about 12 hours on 2 CPU
cores, longer than the machines this project is developed on are kept: their
`runs/` does not survive. `save` copies into the tracked folder
docs/experiments/regeneration/ what a later machine needs to go on where this
one stopped, small enough to commit:

* every finished job's record (`<out>/<job>.json`: command, machine, times,
  result, section) and its figure;
* each feature run's step-1 network, as its last checkpoint and summary
  (training resumes there and ends at once; a few MB), except the copies of
  another run's network (the diagnostic runs), which are copied again; a
  step 1 still training, as its last checkpoint (training resumes there);
* each classification job's CleanNet weights (and CleanNet*'s);
* each classification variant that finished: its summary and, for w_soft
  and the clean variant, its classifier (CleanNet* is trained on w_soft's
  features; the checks on other labels reuse the clean variant through
  --clean_from, which copies its classifier); a variant still training, as
  its last checkpoint alone (training resumes there: a from-scratch variant
  takes 45 to 130 minutes on 2 cores, more than what is left of some
  sessions). The classifiers of docs/experiments/oracle_weighting.py
  (<feature run>/oracle-scratch/correct-<share>) are kept the same way, as
  their summary or last checkpoint.

`restore` puts them back under --out and rebuilds what is derived from them:
each restored feature run's features and reference sets, by rerunning its
recorded command (step 1 is found finished). Then the benchmark command skips
the finished jobs and variants and goes on. What was half done when the
machine went (a step-1 or variant training between checkpoints, a detection
job's CleanNet runs) is redone.

Step 1 reproduces to the digit only on the same kind of processor (the
record names the machine); the features rebuilt on another kind differ in
the last digits.
"""

import fnmatch
import glob
import json
import os
import shutil
import subprocess
import sys

ARCHIVE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "regeneration")
# Variants whose classifier a later job reads, besides their summary (paths
# under a feature run): CleanNet* reads w_soft's; --clean_from copies the
# from-scratch clean variant.
VARIANTS_WITH_MODELS = ("classification*/finetune-w_soft", "classification-scratch/finetune-clean")
# A classification job's CleanNet weights (with the summary that marks that
# CleanNet finished) and CleanNet*'s.
# Folders of trained classifiers under a feature run: the classification
# jobs' variants and oracle_weighting.py's runs.
CLASSIFIER_RUNS = (os.path.join("classification*", "finetune-*"),
                   os.path.join("oracle-scratch", "correct-*"))
JOB_WEIGHTS = ("weights.npz", os.path.join("cleannet", "summary.json"),
               os.path.join("cleannet-star", "weights.npz"))


def _copy(source, target):
  os.makedirs(os.path.dirname(target), exist_ok=True)
  shutil.copyfile(source, target + ".tmp")
  os.replace(target + ".tmp", target)


def _save_last_checkpoint(step1_dir, target_dir):
  """Copies step1_dir's newest checkpoint, with a state file naming it alone."""
  checkpoints = os.path.join(step1_dir, "checkpoints")
  with open(os.path.join(checkpoints, "checkpoint"), encoding="utf-8") as f:
    name = f.readline().split(":", 1)[1].strip().strip('"')
  shutil.rmtree(os.path.join(target_dir, "checkpoints"), ignore_errors=True)
  for path in glob.glob(os.path.join(checkpoints, name + ".*")):
    _copy(path, os.path.join(target_dir, "checkpoints", os.path.basename(path)))
  os.makedirs(os.path.join(target_dir, "checkpoints"), exist_ok=True)
  with open(os.path.join(target_dir, "checkpoints", "checkpoint"), "w", encoding="utf-8") as f:
    f.write(f'model_checkpoint_path: "{name}"\nall_model_checkpoint_paths: "{name}"\n')


def save(out):
  saved = []
  for record_path in sorted(glob.glob(os.path.join(out, "*.json"))):
    with open(record_path, encoding="utf-8") as f:
      record = json.load(f)
    _copy(record_path, os.path.join(ARCHIVE, "records", os.path.basename(record_path)))
    if record.get("figure") and os.path.exists(record["figure"]):
      _copy(record["figure"], os.path.join(ARCHIVE, "figures", record["name"] + ".png"))
    saved.append(record["name"])
  for step1_dir in sorted(glob.glob(os.path.join(out, "features-*", "step1"))):
    summary = os.path.join(step1_dir, "summary.json")
    target_dir = os.path.join(ARCHIVE, os.path.relpath(step1_dir, out))
    if os.path.exists(summary):
      with open(summary, encoding="utf-8") as f:
        if "reused_from" in json.load(f):
          continue  # a copy of another run's network: copied again on restore
      _copy(summary, os.path.join(target_dir, "summary.json"))
    elif not os.path.exists(os.path.join(step1_dir, "checkpoints", "checkpoint")):
      continue
    # Unfinished, the last checkpoint alone: training resumes there.
    _save_last_checkpoint(step1_dir, target_dir)
    saved.append(os.path.relpath(step1_dir, out)
                 + ("" if os.path.exists(summary) else " (unfinished)"))
  for variant_dir in sorted(path for pattern in CLASSIFIER_RUNS
                            for path in glob.glob(os.path.join(out, "features-*", pattern))):
    target_dir = os.path.join(ARCHIVE, os.path.relpath(variant_dir, out))
    if not os.path.exists(os.path.join(variant_dir, "summary.json")):
      if os.path.exists(os.path.join(variant_dir, "checkpoints", "checkpoint")):
        # A variant trained again: an earlier save's summary would mark it finished.
        for name in ("summary.json", "classifier.keras", "feature_extractor.keras"):
          if os.path.exists(os.path.join(target_dir, name)):
            os.remove(os.path.join(target_dir, name))
        _save_last_checkpoint(variant_dir, target_dir)
        saved.append(os.path.relpath(variant_dir, out) + " (unfinished)")
      continue
    # Finished: its summary replaces the checkpoint an earlier save kept.
    shutil.rmtree(os.path.join(target_dir, "checkpoints"), ignore_errors=True)
    names = ["summary.json"]
    under_run = os.path.relpath(variant_dir, os.path.dirname(os.path.dirname(variant_dir)))
    if any(fnmatch.fnmatch(under_run, pattern) for pattern in VARIANTS_WITH_MODELS):
      names += ["classifier.keras", "feature_extractor.keras"]
    for name in names:
      _copy(os.path.join(variant_dir, name), os.path.join(target_dir, name))
    saved.append(os.path.relpath(variant_dir, out))
  # The CleanNet weights each classification job drew by, so a later machine
  # resumes a variant on the same draws without training CleanNet again.
  for work in sorted(glob.glob(os.path.join(out, "features-*", "classification*"))):
    for name in JOB_WEIGHTS:
      if os.path.exists(os.path.join(work, name)):
        _copy(os.path.join(work, name), os.path.join(ARCHIVE, os.path.relpath(work, out), name))
  print(f"saved into {ARCHIVE}: " + ", ".join(saved))


def restore(out):
  if not os.path.isdir(ARCHIVE):
    sys.exit(f"error: {ARCHIVE}: nothing saved")
  for path in glob.glob(os.path.join(ARCHIVE, "features-*", "**", "*"), recursive=True):
    if os.path.isfile(path):
      _copy(path, os.path.join(out, os.path.relpath(path, ARCHIVE)))
  records = sorted(glob.glob(os.path.join(ARCHIVE, "records", "*.json")))
  for record_path in records:
    with open(record_path, encoding="utf-8") as f:
      record = json.load(f)
    figure = os.path.join(ARCHIVE, "figures", record["name"] + ".png")
    if record.get("figure") and os.path.exists(figure):
      _copy(figure, record["figure"])
  # Feature runs first, in the benchmark's order: a diagnostic run copies
  # another run's step 1. The record is put back last, once the run's files are.
  order = sorted(records, key=lambda p: ("-step1_" in p, p))
  for record_path in order:
    with open(record_path, encoding="utf-8") as f:
      record = json.load(f)
    if record["stage"] == "features":
      print(f"{record['name']}: rebuilding features and reference sets", flush=True)
      subprocess.run([sys.executable, "-m", "tools.cifar10n_features", *record["args"]],
                     check=True, stdout=subprocess.DEVNULL)
  for record_path in records:
    _copy(record_path, os.path.join(out, os.path.basename(record_path)))
  print(f"restored into {out}: " + ", ".join(
      os.path.basename(p).removesuffix(".json") for p in records))


def main(argv):
  commands = {"save": save, "restore": restore}
  if len(argv) < 2 or argv[1] not in commands:
    sys.exit("usage: regeneration.py save|restore [--out=runs/benchmarks]")
  out = next((a.split("=", 1)[1] for a in argv[2:] if a.startswith("--out=")),
             os.path.join("runs", "benchmarks"))
  commands[argv[1]](out)


if __name__ == "__main__":
  main(sys.argv)
