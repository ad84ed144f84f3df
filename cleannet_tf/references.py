"""Reference sets: the per-class feature sets V_c^s of the reference encoder.

Paper Sec. 3.1: for each class c, a small representative set of image features
stands for the class. The paper uses the K-means centroids of all the class's
features (K = 50) and names a random sample of the class's images as the
alternative; both are built here. Sets are padded to a common size K so that
all classes fit one dense [L, K, D] tensor; ``counts`` says how many rows of
each class are real, so the model can mask the padding in its attention.
"""

import dataclasses
import os
import tempfile
import zipfile

from absl import logging
import numpy as np
from sklearn.cluster import KMeans

from cleannet_tf import data
from cleannet_tf.errors import InputError


def _check_sets(features, counts, where):
  """Validates reference-set arrays; raises InputError prefixed by `where`.

  Args:
    features: array expected to be float [L, K, D], L, K, D >= 1, finite, with
      rows >= counts[c] all zero.
    counts: array expected to be integer [L] with values in [0, K].
    where: what to name in the message (a file path or a class name).

  Returns:
    (features float32 [L, K, D], counts int32 [L]).
  """
  features = np.asarray(features)
  counts = np.asarray(counts)
  if features.ndim != 3 or min(features.shape) < 1:
    raise InputError(
        f"{where}: features must have shape [classes, K, dim] with all sizes "
        f">= 1, got {features.shape}")
  if not np.issubdtype(features.dtype, np.floating):
    raise InputError(f"{where}: features must be floating point, got "
                     f"{features.dtype}")
  if not np.all(np.isfinite(features)):
    raise InputError(f"{where}: features contain NaN or Inf")
  num_classes, k, _ = features.shape
  if counts.shape != (num_classes,):
    raise InputError(f"{where}: counts must have shape ({num_classes},) to "
                     f"match features, got {counts.shape}")
  if not np.issubdtype(counts.dtype, np.integer):
    raise InputError(f"{where}: counts must be integers, got {counts.dtype}")
  bad = np.flatnonzero((counts < 0) | (counts > k))
  if bad.size:
    c = int(bad[0])
    raise InputError(f"{where}: counts[{c}] = {int(counts[c])} is outside "
                     f"[0, {k}]")
  padding = np.arange(k)[None, :] >= counts[:, None]
  if np.any(features[padding] != 0):
    # The model masks padding by `counts`; non-zero padding means the counts
    # and the features disagree, i.e. the file was not written by us.
    c = int(np.flatnonzero(np.any(features * padding[:, :, None] != 0,
                                  axis=(1, 2)))[0])
    raise InputError(f"{where}: class {c} has non-zero rows beyond its count "
                     f"{int(counts[c])}")
  return features.astype(np.float32, copy=False), counts.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class ReferenceSets:
  """Padded per-class reference feature sets.

  Attributes:
    features: float32 [L, K, D]; row j of class c is a reference if
      j < counts[c], else zero padding.
    counts: int32 [L]; number of real references of class c, in [0, K]. 0 is
      allowed: a class without images has an empty reference set.
  """

  features: np.ndarray
  counts: np.ndarray

  def __post_init__(self):
    features, counts = _check_sets(self.features, self.counts, "ReferenceSets")
    # Frozen dataclass: normalise dtypes once so consumers can rely on them.
    object.__setattr__(self, "features", features)
    object.__setattr__(self, "counts", counts)

  @property
  def num_classes(self) -> int:
    """L, the number of classes."""
    return self.features.shape[0]

  @property
  def k(self) -> int:
    """K, the padded reference-set size."""
    return self.features.shape[1]

  @property
  def dim(self) -> int:
    """D, the feature width."""
    return self.features.shape[2]

  def save(self, path):
    """Writes an .npz file (keys ``features``, ``counts``; no pickle).

    The file is written to a temporary name in the same directory and then
    renamed, so a reader never sees a half-written file and a crash leaves the
    previous version intact.

    Args:
      path: destination file path (str or os.PathLike), written as given.
    """
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
      with os.fdopen(fd, "wb") as f:
        np.savez(f, features=self.features, counts=self.counts)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except BaseException:
      os.unlink(tmp)
      raise

  @classmethod
  def load(cls, path) -> "ReferenceSets":
    """Reads and validates a file written by `save`.

    Args:
      path: .npz file path (str or os.PathLike).

    Returns:
      The ReferenceSets.

    Raises:
      InputError: naming `path`, if the file is unreadable, lacks a key, or the
        arrays are inconsistent (shapes, counts outside [0, K], non-finite
        values, non-zero padding).
    """
    path = os.fspath(path)
    try:
      data = np.load(path, allow_pickle=False)
      if not isinstance(data, np.lib.npyio.NpzFile):
        raise InputError(f"{path}: not an .npz archive")
      with data:
        arrays = {name: data[name] for name in ("features", "counts")
                  if name in data.files}
    except InputError:
      raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
      # ValueError also covers object arrays refused by allow_pickle=False.
      raise InputError(f"{path}: cannot read reference sets: {e}") from e
    missing = {"features", "counts"} - set(arrays)
    if missing:
      raise InputError(f"{path}: missing array(s) {sorted(missing)}")
    features, counts = arrays["features"], arrays["counts"]
    features, counts = _check_sets(features, counts, path)
    return cls(features=features, counts=counts)


def _group_by_class(fn, features, class_ids, num_classes, k):
  """Validates builder inputs and groups row indices by class.

  Args:
    fn: builder name for error messages.
    features: float [N, D].
    class_ids: int [N] in [0, num_classes).
    num_classes: L >= 1.
    k: reference-set size K >= 1.

  Returns:
    (features float32 [N, D], order int64 [N] row indices sorted by class,
    starts int64 [L + 1]: class c's rows are order[starts[c]:starts[c + 1]]).
  """
  features = np.asarray(features)
  class_ids = np.asarray(class_ids)
  if features.ndim != 2 or features.shape[1] < 1:
    raise InputError(f"{fn}: features must have shape [rows, dim], got "
                     f"{features.shape}")
  if not np.all(np.isfinite(features)):
    raise InputError(f"{fn}: features contain NaN or Inf")
  if class_ids.shape != (features.shape[0],):
    raise InputError(f"{fn}: class_ids must have shape ({features.shape[0]},) "
                     f"to match features, got {class_ids.shape}")
  if class_ids.size and not np.issubdtype(class_ids.dtype, np.integer):
    raise InputError(f"{fn}: class_ids must be integers, got "
                     f"{class_ids.dtype}")
  if num_classes < 1:
    raise InputError(f"{fn}: num_classes must be >= 1, got {num_classes}")
  if k < 1:
    raise InputError(f"{fn}: k must be >= 1, got {k}")
  class_ids = class_ids.astype(np.int64)
  if class_ids.size and (class_ids.min() < 0 or
                         class_ids.max() >= num_classes):
    raise InputError(f"{fn}: class_ids must be in [0, {num_classes}), got "
                     f"range [{class_ids.min()}, {class_ids.max()}]")
  # Stable, so rows of a class keep their input order (deterministic output).
  order = np.argsort(class_ids, kind="stable")
  starts = np.zeros(num_classes + 1, np.int64)
  np.cumsum(np.bincount(class_ids, minlength=num_classes), out=starts[1:])
  return features.astype(np.float32, copy=False), order, starts


def _class_seeds(seed, num_classes):
  """One independent int seed per class, all derived from `seed`."""
  return np.random.default_rng(seed).integers(0, 2**31 - 1, size=num_classes)


def build_kmeans_references(features, class_ids, num_classes, k=50, seed=0,
                            max_iter=50, n_init=3) -> ReferenceSets:
  """Reference sets from per-class K-means centroids (the paper's choice).

  For each class with more than `k` rows, the `k` centroids of a k-means++ /
  Lloyd K-means on that class's rows. A class with 1..k rows uses all its rows
  (in input order); a class without rows gets count 0. A class with more than
  `k` rows but fewer distinct ones gets repeated centroids (sklearn warns).

  Args:
    features: float [N, D] image features.
    class_ids: int [N], noisy class label of each row, in [0, num_classes).
    num_classes: L.
    k: K, centroids per class (paper: 50).
    seed: makes the result deterministic; each class gets its own derived seed.
    max_iter: Lloyd iterations per K-means run.
    n_init: K-means restarts per class; the lowest-inertia run is kept.

  Returns:
    ReferenceSets with features float32 [L, k, D] and counts int32 [L].
  """
  return _build_in_memory("build_kmeans_references", features, class_ids, num_classes,
                          k, "kmeans", seed, max_iter, n_init)


def build_random_references(features, class_ids, num_classes, k=50,
                            seed=0) -> ReferenceSets:
  """Reference sets from a random sample of each class's rows.

  The paper's alternative to K-means (Sec. 3.1): for each class with more than
  `k` rows, `k` of its rows drawn without replacement; a class with 1..k rows
  uses all its rows; a class without rows gets count 0.

  Args:
    features: float [N, D] image features.
    class_ids: int [N], noisy class label of each row, in [0, num_classes).
    num_classes: L.
    k: K, references per class.
    seed: makes the result deterministic.

  Returns:
    ReferenceSets with features float32 [L, k, D] and counts int32 [L].
  """
  return _build_in_memory("build_random_references", features, class_ids, num_classes,
                          k, "random", seed, max_iter=50, n_init=3)


def _build_in_memory(fn, features, class_ids, num_classes, k, method, seed, max_iter,
                     n_init):
  """Both in-memory builders: group rows by class, reduce each class."""
  features, order, starts = _group_by_class(fn, features, class_ids, num_classes, k)
  out = np.zeros((num_classes, k, features.shape[1]), np.float32)
  counts = np.zeros(num_classes, np.int32)
  seeds = _class_seeds(seed, num_classes)
  rng = np.random.default_rng(seed)
  for c in range(num_classes):
    rows = features[order[starts[c]:starts[c + 1]]]
    references, counts[c] = _class_references(rows, k, method, seeds[c], rng, max_iter,
                                              n_init)
    out[c, :counts[c]] = references
  return ReferenceSets(features=out, counts=counts)


def _class_references(rows, k, method, seed, rng, max_iter, n_init):
  """One class's references and count; shared by every builder, so they agree.

  Args:
    rows: float32 [n, D], the class's rows in input order.
    seed: this class's K-means seed (``_class_seeds``).
    rng: the random method's generator, shared across classes in class order.

  Returns:
    (float32 [min(n, k), D], min(n, k)).
  """
  if len(rows) > k and method == "kmeans":
    km = KMeans(n_clusters=k, init="k-means++", n_init=n_init,
                max_iter=max_iter, algorithm="lloyd",
                random_state=int(seed)).fit(rows)
    return km.cluster_centers_, k
  if len(rows) > k:
    return rows[rng.choice(len(rows), size=k, replace=False)], k
  return rows, len(rows)


def build_references_streamed(info, k=50, method="kmeans", seed=0, max_iter=50,
                              n_init=3, work_dir=None, batch_size=8192,
                              keep=None) -> ReferenceSets:
  """Reference sets of a feature set too large for memory, one class at a time.

  One streaming pass spills each class's rows, in row order, into its own
  raw float32 file in a temporary folder; then each class's file is loaded
  alone and reduced to K references. Memory holds one batch, then one class's
  rows (plus the [L, K, D] result); the spill needs N * D * 4 bytes of disk.
  The result equals ``build_kmeans_references`` / ``build_random_references``
  on the same rows with the same seed.

  Args:
    info: a ``data.FeatureSetInfo``.
    k: K, references per class (paper: 50).
    method: "kmeans" (the paper's) or "random".
    seed: makes the result deterministic.
    max_iter, n_init: K-means settings, as in ``build_kmeans_references``.
    work_dir: where the temporary spill folder goes (default: system temp).
    batch_size: rows per streamed batch.
    keep: optional fn(batch) -> bool [B] over a batch of ``data.feature_dataset``
      rows (NumPy arrays "features" [B, D], "class_id" [B], ...): only the rows
      it keeps are reduced (``training.refined_reference_sets``); default all.

  Returns:
    ReferenceSets with features float32 [L, k, D] and counts int32 [L].
  """
  if method not in ("kmeans", "random"):
    raise InputError(f"--method: {method!r} is not 'kmeans' or 'random'")
  if k < 1:
    raise InputError(f"build_references_streamed: k must be >= 1, got {k}")
  num_classes, dim = info.num_classes, info.dim
  class_rows = info.class_counts.sum(axis=1)
  spilled = np.zeros(num_classes, np.int64)
  out = np.zeros((num_classes, k, dim), np.float32)
  counts = np.zeros(num_classes, np.int32)
  seeds = _class_seeds(seed, num_classes)
  rng = np.random.default_rng(seed)
  with tempfile.TemporaryDirectory(prefix="references-", dir=work_dir) as spill:
    paths = [os.path.join(spill, f"class-{c:06d}.f32") for c in range(num_classes)]
    for batch in data.feature_dataset(info).batch(batch_size).as_numpy_iterator():
      features, ids = batch["features"], batch["class_id"]
      if keep is not None:
        kept = np.asarray(keep(batch), bool)
        features, ids = features[kept], ids[kept]
      # Stable: each class's rows keep their input order within the batch.
      order = np.argsort(ids, kind="stable")
      present, starts = np.unique(ids[order], return_index=True)
      for c, rows in zip(present, np.split(features[order], starts[1:])):
        with open(paths[c], "ab") as f:
          rows.astype(np.float32, copy=False).tofile(f)
        spilled[c] += len(rows)
    for c in range(num_classes):
      if keep is None and spilled[c] != class_rows[c]:
        raise InputError(f"{info.directory}: class {c} has {spilled[c]} rows, "
                         f"metadata says {class_rows[c]}")
      if not spilled[c]:
        continue
      rows = np.fromfile(paths[c], dtype=np.float32).reshape(-1, dim)
      os.remove(paths[c])  # keep the spill shrinking as classes are done
      if not np.all(np.isfinite(rows)):
        raise InputError(f"{info.directory}: class {c}'s features contain NaN "
                         "or Inf")
      references, counts[c] = _class_references(rows, k, method, seeds[c], rng,
                                                 max_iter, n_init)
      out[c, :counts[c]] = references
  return ReferenceSets(features=out, counts=counts)


def load_or_build(info, path, model_dir, k=50, seed=0) -> ReferenceSets:
  """The reference sets to train on `info` with: given, kept from an earlier run, or built.

  `path` (an .npz) when given; else ``<model_dir>/references.npz`` when a
  previous run kept one; else K-means sets built streamed from `info` and kept
  there, so that a resumed run trains on the same sets.
  """
  if path:
    reference_sets = ReferenceSets.load(path)
  else:
    path = os.path.join(model_dir, "references.npz")
    if os.path.exists(path):
      reference_sets = ReferenceSets.load(path)
    else:
      logging.info("Building K-means reference sets (K=%d) from %s", k, info.directory)
      reference_sets = build_references_streamed(info, k=k, seed=seed, work_dir=model_dir)
      reference_sets.save(path)
  if (reference_sets.num_classes, reference_sets.dim) != (info.num_classes, info.dim):
    raise InputError(f"{path}: reference sets for {reference_sets.num_classes} classes of "
                     f"{reference_sets.dim}-d features, but {info.directory} has "
                     f"{info.num_classes} classes of {info.dim}-d features")
  return reference_sets
