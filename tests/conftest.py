"""Test set-up: quiet TensorFlow, and two logical CPUs for multi-replica tests.

The CPU must be split before anything else initialises TensorFlow's devices,
so it happens here, when pytest imports this file first.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # pylint: disable=g-import-not-at-top

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import pytest  # pylint: disable=g-import-not-at-top,g-bad-import-order


@pytest.fixture(scope="session")
def two_cpu_strategy():
  """One MirroredStrategy over the two logical CPUs, shared by all tests.

  Each MirroredStrategy numbers its collective ops from the same start; two
  of them over the same devices in one process can clash ("Shape mismatch in
  the collective instance"), so tests share this one.
  """
  return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def pytest_collection_modifyitems(items):
  """Slow tests first: with `make test`'s two processes, one started last would
  keep one process busy long after the other has finished."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
