"""CleanNet (Lee et al., CVPR 2018) for TensorFlow 2 / Keras 3.

The package follows the pipeline: ``data`` (feature files) -> ``references``
(reference sets) -> ``model`` and ``losses`` -> ``training`` -> ``detection``
(threshold, metrics, sample weights) and ``scoring`` -> export.
"""

__version__ = "0.1.0"
