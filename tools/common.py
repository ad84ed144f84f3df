"""What every absl tool shares: one-line errors and the TensorFlow log level.

Imports no TensorFlow itself (``load_keras`` does, when called).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top

from cleannet_tf.errors import InputError  # pylint: disable=g-import-not-at-top


def run(main):
  """``app.run(main)``, printing an InputError as one line and exiting 2."""

  def guarded(argv):
    if len(argv) > 1:
      sys.exit(f"error: unexpected arguments {' '.join(argv[1:])!r} (flags start with --)")
    try:
      return main(argv)
    except InputError as error:
      sys.exit(f"error: {error}")

  app.run(guarded)


def load_keras(path, what="a CleanNet model"):
  """``keras.models.load_model`` with a one-line InputError naming the file."""
  # Imported here, not at the top, so that this module stays free of
  # TensorFlow for tools that only orchestrate (tools.benchmarks).
  import keras  # pylint: disable=g-import-not-at-top
  from cleannet_tf import model as _  # pylint: disable=g-import-not-at-top,unused-import (registers CleanNet with Keras)
  try:
    return keras.models.load_model(path)
  except (OSError, ValueError) as error:
    raise InputError(f"{path}: cannot load {what} ({error})") from None
