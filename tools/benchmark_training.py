"""CleanNet training steps per second: the library's loop against one call a step.

  python -m tools.benchmark_training [--train_features=DIR] [--references=refs.npz]
      [--timed_steps=1000 --steps_per_call=100 --rounds=3] [model and training flags]

Times ``training.Trainer`` three ways in one process, on the same features,
reference sets and settings:
  one_call_per_step_no_xla  the reference: one uncompiled ``tf.function`` call
                            a step (how the loop ran before it was looped);
  looped_no_xla             --steps_per_call steps inside one call, uncompiled;
  looped                    the library's default: looped, and each step
                            compiled by XLA when no distribution strategy is in
                            use (``Trainer.jit_compile``).
Each figure is the best of --rounds timings of --timed_steps steps after a
warm-up call that traces and compiles. Prints steps/s and the ratio to the
reference, then a JSON report. Without --train_features, the digits demo's
features (written to --work_dir) stand in; without --references, K-means sets
(K = --num_references) are built from the features first.
"""

import json
import os
import time

from absl import flags

from tools import cleannet_flags, common
from cleannet_tf import data, demo_data, distribute, references, training
from cleannet_tf.errors import InputError

flags.DEFINE_string("train_features", None,
                    "Feature set to train on; default: the digits demo's, in --work_dir.")
flags.DEFINE_string("references", None, "Reference sets (.npz); default: built from the "
                    "features.")
flags.DEFINE_string("work_dir", os.path.join("runs", "benchmark_training"),
                    "Scratch folder: the demo features and the trainers' model directories.")
flags.DEFINE_integer("steps_per_call", 100, "Steps per call of the looped variants.")
flags.DEFINE_integer("timed_steps", 1000, "Steps per timing (a multiple of --steps_per_call).")
flags.DEFINE_integer("rounds", 3, "Timings per variant; the best counts.")
FLAGS = flags.FLAGS

REFERENCE = "one_call_per_step_no_xla"
# name: (Trainer's jit_compile, steps per call; None: --steps_per_call).
VARIANTS = {REFERENCE: (False, 1), "looped_no_xla": (False, None), "looped": (None, None)}


def steps_per_second(trainer, steps_per_call, timed_steps, rounds):
  """Best-of-`rounds` training speed of `trainer` through ``Trainer.run_steps``."""
  float(trainer.run_steps(steps_per_call)["loss"])  # warm-up: trace and compile
  calls = max(1, timed_steps // steps_per_call)
  best = float("inf")
  for _ in range(rounds):
    started = time.perf_counter()
    for _ in range(calls):
      metrics = trainer.run_steps(steps_per_call)
    float(metrics["loss"])  # waits for the last call to finish
    best = min(best, time.perf_counter() - started)
  return calls * steps_per_call / best


def main(_):
  if FLAGS.steps_per_call < 1 or FLAGS.timed_steps < FLAGS.steps_per_call or FLAGS.rounds < 1:
    raise InputError("--steps_per_call and --rounds must be at least 1 and "
                            "--timed_steps at least --steps_per_call")
  os.makedirs(FLAGS.work_dir, exist_ok=True)
  info = (data.read_info(FLAGS.train_features) if FLAGS.train_features
          else demo_data.make_digits_demo().feature_set(os.path.join(FLAGS.work_dir,
                                                                      "features")))
  if FLAGS.references:
    reference_sets = references.ReferenceSets.load(FLAGS.references)
  else:
    reference_sets = references.build_references_streamed(
        info, k=FLAGS.num_references, seed=FLAGS.seed, work_dir=FLAGS.work_dir)
  model_config = cleannet_flags.model_config(info.num_classes, info.dim)
  model_config["num_references"] = reference_sets.k
  config = cleannet_flags.train_config()
  strategy = distribute.make_strategy(FLAGS.strategy)
  print(f"{info.directory}: {info.num_rows} rows, {info.num_classes} classes, "
        f"{info.dim}-d features; K={reference_sets.k}, batch {config.global_batch_size}, "
        f"{strategy.num_replicas_in_sync} replica(s)")
  results = {}
  for name, (jit_compile, steps_per_call) in VARIANTS.items():
    trainer = training.Trainer(model_config, reference_sets, info,
                               os.path.join(FLAGS.work_dir, name), config, strategy,
                               jit_compile=jit_compile)
    results[name] = {"steps_per_second": steps_per_second(
        trainer, steps_per_call or FLAGS.steps_per_call, FLAGS.timed_steps, FLAGS.rounds),
                     "xla": trainer.jit_compile}
  for name, result in results.items():
    result["ratio"] = result["steps_per_second"] / results[REFERENCE]["steps_per_second"]
    print(f"  {name:<26} {result['steps_per_second']:8.1f} steps/s  "
          f"{result['ratio']:5.2f}x the reference (XLA: {result['xla']})")
  print(json.dumps({"features": info.directory, "steps_per_call": FLAGS.steps_per_call,
                    "timed_steps": FLAGS.timed_steps, "rounds": FLAGS.rounds,
                    "results": results}, indent=2))


def run():
  common.run(main)


if __name__ == "__main__":
  run()
