"""Choosing a ``tf.distribute`` strategy and who writes files under it."""

import json
import os

import tensorflow as tf

from cleannet_tf.errors import InputError

STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "one_device")


def _tf_config_has_cluster():
  try:
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
  except json.JSONDecodeError as error:
    raise InputError(f"TF_CONFIG: not valid JSON ({error.msg})") from None
  return sum(len(tasks) for tasks in cluster.values()) > 1


def make_strategy(name="auto"):
  """Returns the strategy for a ``--strategy`` flag value.

  ``auto``: MultiWorkerMirroredStrategy when ``TF_CONFIG`` describes a cluster,
  else MirroredStrategy over all visible GPUs when there are any, else the
  default (single-device) strategy.
  """
  if name not in STRATEGIES:
    raise InputError(f"--strategy: {name!r} is not one of {', '.join(STRATEGIES)}")
  if name == "auto":
    if _tf_config_has_cluster():
      name = "multi_worker"
    elif tf.config.list_physical_devices("GPU"):
      name = "mirrored"
    else:
      name = "default"
  if name == "multi_worker":
    return tf.distribute.MultiWorkerMirroredStrategy()
  if name == "mirrored":
    return tf.distribute.MirroredStrategy()
  if name == "one_device":
    device = "/gpu:0" if tf.config.list_physical_devices("GPU") else "/cpu:0"
    return tf.distribute.OneDeviceStrategy(device)
  return tf.distribute.get_strategy()


def is_default(strategy):
  """Whether `strategy` is the default one (no distribution) and no other is in scope."""
  return not tf.distribute.has_strategy() and strategy is tf.distribute.get_strategy()


def is_chief(strategy):
  """Whether this worker writes the shared outputs (always true off-cluster)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not resolver.cluster_spec().as_dict():
    return True
  task_type, task_id = resolver.task_type, resolver.task_id
  has_chief = "chief" in resolver.cluster_spec().as_dict()
  return task_type == "chief" or (not has_chief and task_type == "worker" and task_id == 0)


def worker_directory(directory, strategy):
  """Where this worker writes checkpoints.

  Saving is collective under MultiWorkerMirroredStrategy, so every worker must
  write somewhere; non-chief workers use a private scratch folder.
  """
  if is_chief(strategy):
    return directory
  resolver = strategy.cluster_resolver
  return os.path.join(directory, "workers", f"{resolver.task_type}_{resolver.task_id}")
