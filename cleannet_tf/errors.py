"""The one error type that user-facing tools turn into a one-line message."""


class InputError(ValueError):
  """Bad user input: a file, row or flag that cannot be used.

  The message always names where the problem is, e.g.
  ``"data/train.tsv:17: feature width 2047, expected 2048"``, so that tools can
  print it as a single line without a traceback.
  """
