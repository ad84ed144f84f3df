"""Generated sections of a Markdown file such as BENCHMARKS.md, and their figures.

A section is the text between the lines ``<!-- {name}:begin -->`` and
``<!-- {name}:end -->``. Tools regenerate their own sections; the text outside
the markers is never touched, so prose written by hand around them stays.
"""

import os

from absl import logging


def markers(name):
  """The (begin, end) marker lines of section `name`, without newlines."""
  return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def replace_section(text, name, section):
  """`text` with the part between section `name`'s markers replaced by `section`.

  The markers are appended at the end when missing; nothing outside them
  changes. A `section` without a final newline gets one, so the end marker
  stays on its own line.
  """
  begin, end = markers(name)
  if section and not section.endswith("\n"):
    section += "\n"
  start = text.find(begin)
  stop = text.find(end, start) if start >= 0 else -1
  if start < 0 or stop < 0:
    separator = "" if not text or text.endswith("\n") else "\n"
    return f"{text}{separator}\n{begin}\n{section}{end}\n"
  return f"{text[:start + len(begin)]}\n{section}{text[stop:]}"


def extract_section(text, name):
  """The text between section `name`'s markers, or None without them."""
  begin, end = markers(name)
  start = text.find(begin)
  stop = text.find(end, start) if start >= 0 else -1
  if start < 0 or stop < 0:
    return None
  return text[start + len(begin):stop].removeprefix("\n")


def read_text(path):
  """The file's text; "" when it does not exist."""
  if not os.path.exists(path):
    return ""
  with open(path, encoding="utf-8") as f:
    return f.read()


def update_file(path, name, section):
  """Replaces section `name` of the file at `path` (created if missing), atomically."""
  from cleannet_tf import data  # pylint: disable=g-import-not-at-top (imports TensorFlow)
  data.atomic_write_text(path, replace_section(read_text(path), name, section))


def pyplot(what):
  """matplotlib's pyplot on the Agg backend, or None with a warning.

  matplotlib is the `benchmark` extra; without it figures are skipped.
  """
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning("matplotlib is not installed: no %s", what)
    return None
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt
