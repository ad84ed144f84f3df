"""Feature files: the on-disk format for extracted image features, and readers.

A *feature set* is a directory holding

* ``features-00000.tfrecord``, ...: ``tf.train.Example`` records with features
  ``key`` (bytes), ``features`` (float list of length D), ``class_id`` (int64)
  and ``verification`` (int64: 1 = noisy label is correct, 0 = mislabeled,
  -1 = unknown);
* ``classes.txt``: class names, one per line, line i = class id i;
* ``metadata.json``: format tag, D, class and row counts and the shard list.

Every file is written under a temporary name and renamed when complete, and
``metadata.json`` is written last, so a directory without it is an unfinished
(or failed) write and ``read_info`` refuses it.

Rows also come from the CleanNet authors' TSV layout (``key \\t class_name \\t
verification \\t comma-joined floats``); ``read_authors_tsv`` parses it in
vectorised chunks and ``convert_tsv`` streams it into a feature set.
"""

import contextlib
import dataclasses
import itertools
import json
import os
import tempfile
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import tensorflow as tf

from cleannet_tf.errors import InputError

FORMAT = "cleannet_tf.features/1"
METADATA_FILE = "metadata.json"
CLASSES_FILE = "classes.txt"
VERIFICATION_VALUES = (-1, 0, 1)
VERIFICATION_FILTERS = ("all", "verified", "unverified")

_SHARD_PATTERN = "features-{:05d}.tfrecord"
# Temporary files start with a dot and end in ".tmp" so that an aborted write
# is easy to recognise and never matches a shard name.
_TMP_SUFFIX = ".tmp"
_TSV_COLUMNS = 4
_STR = np.dtypes.StringDType()

# Why a TSV row is rejected, in the order the checks run; 0 = row is good.
(_OK, _NOT_UTF8, _COLUMNS, _EMPTY_KEY, _UNKNOWN_CLASS, _BAD_LABEL, _WIDTH,
 _UNPARSABLE, _NON_FINITE) = range(9)

RejectsCallback = Callable[[str, int, str, str], None]


def atomic_write_text(path: str, text: str) -> None:
  """Writes `text` to `path` so that readers see the old file or the new one."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(
      dir=directory, prefix="." + os.path.basename(path) + ".",
      suffix=_TMP_SUFFIX)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    _remove_quietly(tmp)
    raise


def _remove_quietly(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


def check_class_names(names: Sequence[str], source: str) -> tuple[str, ...]:
  """Returns `names` as a tuple; InputError names the 1-based line at fault."""
  names = tuple(names)
  if not names:
    raise InputError(f"{source}: no class names")
  first_line = {}
  for line, name in enumerate(names, start=1):
    if not isinstance(name, str):
      raise InputError(f"{source}:{line}: class name {name!r} is not a string")
    if not name.strip():
      raise InputError(f"{source}:{line}: blank class name")
    if "\n" in name or "\r" in name or "\t" in name:
      # Names must survive a round trip through classes.txt and TSV columns.
      raise InputError(
          f"{source}:{line}: class name {name!r} contains a tab or newline")
    if name in first_line:
      raise InputError(f"{source}:{line}: duplicate class name {name!r} "
                       f"(first on line {first_line[name]})")
    first_line[name] = line
  return names


def read_class_names(path) -> list[str]:
  """Reads ``classes.txt``: one name per line, line i (0-based) = class id i.

  Raises:
    InputError: the file is missing, not UTF-8 or empty, or a line is blank or
      repeats an earlier name (the message names ``path:line``).
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise InputError(f"{path}: cannot read class names ({e.strerror})") from e
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise InputError(f"{path}:{line}: not valid UTF-8") from e
  if not text:
    raise InputError(f"{path}: empty class names file")
  lines = text.split("\n")
  if lines[-1] == "":
    # The newline after the last name is a terminator, not a blank line.
    lines.pop()
  return list(check_class_names([l.rstrip("\r") for l in lines], path))


def write_class_names(path, names: Sequence[str]) -> None:
  """Writes ``classes.txt`` atomically; InputError if `names` is unusable."""
  path = os.fspath(path)
  names = check_class_names(names, path)
  atomic_write_text(path, "".join(name + "\n" for name in names))


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureSetInfo:
  """What ``metadata.json`` and ``classes.txt`` say about a feature set.

  Attributes:
    directory: the feature set's directory.
    dim: feature width D.
    class_names: L names; index = class id.
    num_rows: N, rows over all shards.
    shard_paths: shard files, in row order.
    class_counts: int64 [L, 3]; row c counts class c's rows with verification
      -1, 0, 1 (columns in that order).
    shard_num_rows: rows in each shard, aligned with `shard_paths`; may be
      left empty in an info built by hand, which makes reads sequential.
  """
  directory: str
  dim: int
  class_names: tuple[str, ...]
  num_rows: int
  shard_paths: tuple[str, ...]
  class_counts: np.ndarray
  shard_num_rows: tuple[int, ...] = ()

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def num_verified(self) -> int:
    """Rows whose verification is 0 or 1."""
    return int(self.class_counts[:, 1:].sum())


def _metadata_int(meta: dict, name: str, where: str, minimum: int) -> int:
  value = meta.get(name)
  # bool is an int subclass; a JSON true is not a count.
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise InputError(
        f"{where}: {name!r} must be an integer >= {minimum}, got {value!r}")
  return value


def read_info(directory) -> FeatureSetInfo:
  """Reads and checks a feature set's ``metadata.json`` and ``classes.txt``.

  Raises:
    InputError: naming the directory or file, if ``metadata.json`` is missing
      (not a feature set, or its write did not finish), malformed or
      inconsistent, ``classes.txt`` is bad, or a listed shard is missing.
  """
  directory = os.fspath(directory)
  meta_path = os.path.join(directory, METADATA_FILE)
  if not os.path.isfile(meta_path):
    raise InputError(f"{directory}: not a feature set, or its write did not "
                     f"finish (no {METADATA_FILE})")
  try:
    with open(meta_path, encoding="utf-8") as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise InputError(f"{meta_path}: malformed metadata ({e})") from e
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    found = meta.get("format") if isinstance(meta, dict) else None
    raise InputError(f"{meta_path}: format {found!r}, expected {FORMAT!r}")
  dim = _metadata_int(meta, "dim", meta_path, 1)
  num_classes = _metadata_int(meta, "num_classes", meta_path, 1)
  num_rows = _metadata_int(meta, "num_rows", meta_path, 1)

  class_names = tuple(read_class_names(os.path.join(directory, CLASSES_FILE)))
  if len(class_names) != num_classes:
    raise InputError(f"{meta_path}: num_classes {num_classes}, but "
                     f"{CLASSES_FILE} has {len(class_names)} names")

  shards = meta.get("shards")
  if not isinstance(shards, list) or not shards:
    raise InputError(f"{meta_path}: 'shards' must be a non-empty list")
  shard_paths, shard_num_rows = [], []
  for i, shard in enumerate(shards):
    where = f"{meta_path}: shards[{i}]"
    name = shard.get("file") if isinstance(shard, dict) else None
    # Only bare names: a shard list must not point outside the directory.
    if not isinstance(name, str) or os.path.basename(name) != name or not name:
      raise InputError(f"{where}: bad file name {name!r}")
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      raise InputError(f"{directory}: shard {name} listed in {METADATA_FILE} "
                       "is missing")
    shard_paths.append(path)
    shard_num_rows.append(_metadata_int(shard, "num_rows", where, 1))
  if sum(shard_num_rows) != num_rows:
    raise InputError(f"{meta_path}: shards hold {sum(shard_num_rows)} rows, "
                     f"num_rows is {num_rows}")

  try:
    counts = np.asarray(meta.get("class_counts"), dtype=np.int64)
  except (TypeError, ValueError) as e:
    raise InputError(f"{meta_path}: malformed class_counts ({e})") from e
  if (counts.shape != (num_classes, len(VERIFICATION_VALUES))
      or (counts < 0).any() or counts.sum() != num_rows):
    raise InputError(f"{meta_path}: class_counts must be [{num_classes}, 3] "
                     f"non-negative counts summing to {num_rows}")
  counts.setflags(write=False)
  return FeatureSetInfo(
      directory=directory, dim=dim, class_names=class_names,
      num_rows=num_rows, shard_paths=tuple(shard_paths), class_counts=counts,
      shard_num_rows=tuple(shard_num_rows))


def _first_bad(checks: Sequence[tuple[np.ndarray, Callable[[int], str]]],
               n: int) -> Optional[tuple[int, str]]:
  """(index, message) of the first row failing a check; None if all pass.

  Args:
    checks: (bad mask bool [n], message(index)) pairs, in priority order.
    n: number of rows.
  """
  bad = np.zeros(n, dtype=bool)
  for mask, _ in checks:
    bad |= mask
  if not bad.any():
    return None
  i = int(np.argmax(bad))
  return i, next(message(i) for mask, message in checks if mask[i])


class FeatureWriter:
  """Writes a feature set; rows arrive in chunks of numpy arrays.

  Use as a context manager: on an exception the shards written so far and the
  temporary files are removed and no ``metadata.json`` is written, so the
  directory is never mistaken for a complete feature set.
  """

  def __init__(self, directory, dim: int, class_names: Sequence[str],
               rows_per_shard: int = 100_000):
    """Starts a feature set in `directory` (created if needed).

    An existing ``metadata.json`` there is removed first, so that the
    directory reads as unfinished until this write completes.
    """
    if not isinstance(dim, (int, np.integer)) or dim < 1:
      raise InputError(f"feature dimension must be a positive integer, "
                       f"got {dim!r}")
    if rows_per_shard < 1:
      raise InputError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    self.directory = os.fspath(directory)
    self.dim = int(dim)
    self.class_names = check_class_names(class_names, "<class_names>")
    self.rows_per_shard = int(rows_per_shard)
    os.makedirs(self.directory, exist_ok=True)
    _remove_quietly(os.path.join(self.directory, METADATA_FILE))
    self._class_counts = np.zeros(
        (len(self.class_names), len(VERIFICATION_VALUES)), dtype=np.int64)
    self._shards: list[tuple[str, int]] = []  # (file name, rows), finished.
    self._writer: Optional[tf.io.TFRecordWriter] = None
    self._tmp_path: Optional[str] = None
    self._shard_rows = 0
    self._num_rows = 0
    self._last_source = "<arrays>"
    self._closed = False

  def __enter__(self) -> "FeatureWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if self._closed:
      return
    if exc_type is not None:
      self.abort()
    else:
      self.close()

  def write(self, keys, features, class_ids, verification,
            source: str = "<arrays>", first_row: int = 1) -> None:
    """Validates and appends a chunk of n rows.

    Args:
      keys: str or bytes array-like [n]; non-empty.
      features: float array-like [n, D]; finite (checked after the cast to
        float32, so values that overflow float32 are rejected too).
      class_ids: integer array-like [n] in [0, L).
      verification: integer array-like [n] in VERIFICATION_VALUES.
      source: names the input in error messages.
      first_row: row number of keys[0] in `source`, for error messages.

    Raises:
      InputError: ``source:row`` of the first bad row; nothing of the chunk
        is written then.
    """
    if self._closed:
      raise RuntimeError("FeatureWriter.write after close")
    self._last_source = source
    key_bytes = [k.encode("utf-8") if isinstance(k, str) else bytes(k)
                 for k in keys]
    n = len(key_bytes)
    try:
      # Overflow to inf is expected here and reported as a non-finite row.
      with np.errstate(over="ignore"):
        feats = np.asarray(features, dtype=np.float32)
    except (TypeError, ValueError) as e:
      raise InputError(f"{source}:{first_row}: features are not a "
                       f"[n, {self.dim}] float array ({e})") from e
    class_ids = np.asarray(class_ids)
    verification = np.asarray(verification)
    if feats.ndim != 2 or len(feats) != n or class_ids.shape != (n,) \
        or verification.shape != (n,):
      raise InputError(
          f"{source}:{first_row}: chunk shapes disagree: {n} keys, features "
          f"{feats.shape}, class_ids {class_ids.shape}, verification "
          f"{verification.shape}")
    if n == 0:
      return
    if feats.shape[1] != self.dim:
      # One width per array, so the first row is the first bad one.
      raise InputError(f"{source}:{first_row}: feature width "
                       f"{feats.shape[1]}, expected {self.dim}")
    for name, values in (("class_ids", class_ids),
                         ("verification", verification)):
      if not np.issubdtype(values.dtype, np.integer):
        raise InputError(f"{source}:{first_row}: {name} must be integers, "
                         f"got dtype {values.dtype}")

    finite = np.isfinite(feats)
    num_classes = len(self.class_names)
    error = _first_bad([
        (np.fromiter(map(len, key_bytes), np.int64, n) == 0,
         lambda i: "empty key"),
        (~finite.all(axis=1),
         lambda i: (f"feature {int(np.argmin(finite[i]))} is "
                    f"{feats[i, np.argmin(finite[i])]}")),
        ((class_ids < 0) | (class_ids >= num_classes),
         lambda i: f"class id {class_ids[i]} outside [0, {num_classes})"),
        (~np.isin(verification, VERIFICATION_VALUES),
         lambda i: f"verification {verification[i]} not in {{-1, 0, 1}}"),
    ], n)
    if error is not None:
      index, reason = error
      raise InputError(f"{source}:{first_row + index}: {reason}")

    class_ids = class_ids.astype(np.int64)
    verification = verification.astype(np.int64)
    # Column = verification + 1 maps -1, 0, 1 onto 0, 1, 2.
    self._class_counts += np.bincount(
        class_ids * 3 + verification + 1,
        minlength=num_classes * 3).reshape(num_classes, 3)
    # tolist() converts the whole chunk in C; the per-row proto building below
    # is the I/O-bound part of writing.
    feature_lists = feats.tolist()
    id_list = class_ids.tolist()
    verification_list = verification.tolist()
    start = 0
    while start < n:
      if self._writer is None:
        self._open_shard()
      stop = min(n, start + self.rows_per_shard - self._shard_rows)
      for i in range(start, stop):
        self._writer.write(_serialize_example(
            key_bytes[i], feature_lists[i], id_list[i], verification_list[i]))
      self._shard_rows += stop - start
      self._num_rows += stop - start
      start = stop
      if self._shard_rows == self.rows_per_shard:
        self._finish_shard()

  def close(self) -> FeatureSetInfo:
    """Finishes the last shard, then writes classes.txt and metadata.json.

    Raises:
      InputError: no rows were written (naming the last source).
    """
    if self._closed:
      raise RuntimeError("FeatureWriter.close called twice")
    if self._num_rows == 0:
      self.abort()
      raise InputError(f"{self._last_source}: no rows")
    if self._writer is not None:
      self._finish_shard()
    self._closed = True
    write_class_names(os.path.join(self.directory, CLASSES_FILE),
                      self.class_names)
    metadata = {
        "format": FORMAT,
        "dim": self.dim,
        "num_classes": len(self.class_names),
        "num_rows": self._num_rows,
        "shards": [{"file": name, "num_rows": rows}
                   for name, rows in self._shards],
        "class_counts": self._class_counts.tolist(),
    }
    atomic_write_text(os.path.join(self.directory, METADATA_FILE),
                       json.dumps(metadata, indent=1) + "\n")
    return read_info(self.directory)

  def abort(self) -> None:
    """Removes the temporary shard and the shards this writer finished."""
    self._closed = True
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    if self._tmp_path is not None:
      _remove_quietly(self._tmp_path)
      self._tmp_path = None
    for name, _ in self._shards:
      _remove_quietly(os.path.join(self.directory, name))
    self._shards = []

  def _open_shard(self) -> None:
    name = _SHARD_PATTERN.format(len(self._shards))
    self._tmp_path = os.path.join(self.directory, "." + name + _TMP_SUFFIX)
    self._writer = tf.io.TFRecordWriter(self._tmp_path)
    self._shard_rows = 0

  def _finish_shard(self) -> None:
    name = _SHARD_PATTERN.format(len(self._shards))
    self._writer.close()
    self._writer = None
    os.replace(self._tmp_path, os.path.join(self.directory, name))
    self._tmp_path = None
    self._shards.append((name, self._shard_rows))


def _serialize_example(key: bytes, features: list[float], class_id: int,
                       verification: int) -> bytes:
  """One row as a serialized tf.train.Example (the shard record format)."""
  return tf.train.Example(features=tf.train.Features(feature={
      "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key])),
      "features": tf.train.Feature(
          float_list=tf.train.FloatList(value=features)),
      "class_id": tf.train.Feature(
          int64_list=tf.train.Int64List(value=[class_id])),
      "verification": tf.train.Feature(
          int64_list=tf.train.Int64List(value=[verification])),
  })).SerializeToString()


def write_features(directory, keys, features, class_ids, verification,
                   class_names: Sequence[str], rows_per_shard: int = 100_000,
                   source: str = "<arrays>") -> FeatureSetInfo:
  """Writes in-memory arrays as a feature set (see FeatureWriter.write)."""
  features = np.asarray(features)
  if features.ndim != 2:
    raise InputError(f"{source}: features must be a [n, D] array, got shape "
                     f"{features.shape}")
  with FeatureWriter(directory, features.shape[1], class_names,
                     rows_per_shard) as writer:
    writer.write(keys, features, class_ids, verification, source=source)
    return writer.close()


def _decode_lines(joined: bytes, raw: list[bytes]) -> tuple[np.ndarray,
                                                           np.ndarray]:
  """Decodes raw lines as UTF-8 without their line terminators.

  Args:
    joined: b"".join(raw).
    raw: the lines, each ending in b"\n" except possibly the last.

  Returns:
    (lines, undecodable): StringDType [n] and bool [n]; undecodable lines are
    decoded with replacement characters, for the rejects file.
  """
  n = len(raw)
  try:
    # One decode and split for the whole chunk instead of one per line.
    lines = np.array(joined.decode("utf-8").split("\n")[:n], dtype=_STR)
    undecodable = np.zeros(n, dtype=bool)
  except UnicodeDecodeError:
    # Error path only: find the bad lines one by one.
    text, undecodable = [], np.zeros(n, dtype=bool)
    for i, line in enumerate(raw):
      try:
        text.append(line.decode("utf-8"))
      except UnicodeDecodeError:
        text.append(line.decode("utf-8", errors="replace"))
        undecodable[i] = True
    lines = np.strings.rstrip(np.array(text, dtype=_STR), "\n")
  if b"\r" in joined:
    # Only CRLF files pay for the strip, which copies every line.
    lines = np.strings.rstrip(lines, "\r")
  return lines, undecodable


def _count_per_line(data: np.ndarray, ends: np.ndarray, char: str
                    ) -> np.ndarray:
  """Occurrences of one ASCII `char` in each line, as int64 [n].

  Args:
    data: uint8 [bytes] of the joined lines.
    ends: int64 [n], exclusive end offset of each line in `data`.
  """
  # Byte-level search: far faster than np.strings.count on long lines.
  positions = np.flatnonzero(data == ord(char))
  return np.diff(np.searchsorted(positions, ends), prepend=0)


def _parse_floats(fields: np.ndarray, dim: int) -> tuple[np.ndarray,
                                                         np.ndarray]:
  """Parses comma-joined floats, each string holding exactly `dim` values.

  Args:
    fields: StringDType [m].
    dim: values per string.

  Returns:
    (values, unparsable): float32 [m, dim] (zero rows where unparsable) and
    bool [m].
  """
  m = len(fields)
  try:
    # One C-level parse for the chunk; a bad token or a dropped empty value
    # shows up as an error or a short count.
    values = np.fromstring(",".join(fields.tolist()), dtype=np.float32,
                           sep=",")
    if values.size == m * dim:
      return values.reshape(m, dim), np.zeros(m, dtype=bool)
  except ValueError:
    pass
  # Error path only: find the bad strings one by one.
  values = np.zeros((m, dim), dtype=np.float32)
  unparsable = np.zeros(m, dtype=bool)
  for i, field in enumerate(fields.tolist()):
    row = _parse_float_list(field)
    if row is None or row.size != dim:
      unparsable[i] = True
    else:
      values[i] = row
  return values, unparsable


def _parse_float_list(text: str) -> Optional[np.ndarray]:
  try:
    return np.fromstring(text, dtype=np.float32, sep=",")
  except ValueError:
    return None


def _first_bad_token(text: str) -> str:
  """The first comma-separated token of `text` that is not one float."""
  for token in text.split(","):
    row = _parse_float_list(token)
    if row is None or row.size != 1:
      return token
  return text


def _lookup(values: np.ndarray, table: dict, missing: int) -> np.ndarray:
  """Maps each string through `table` (else `missing`); int64 like `values`.

  Only the distinct values go through Python, so the cost per chunk is the
  number of distinct strings (at most a few per class), not rows.
  """
  distinct, inverse = np.unique(values, return_inverse=True)
  mapped = np.array([table.get(v, missing) for v in distinct.tolist()],
                    dtype=np.int64)
  return mapped[inverse.reshape(-1)]


def _verification_table(labels: np.ndarray) -> dict:
  table = {}
  for label in np.unique(labels).tolist():
    try:
      value = int(label)
    except ValueError:
      continue
    if value in VERIFICATION_VALUES:
      table[label] = value
  return table


def read_authors_tsv(
    path, class_names: Sequence[str], dim: Optional[int] = None,
    chunk_rows: int = 10_000, rejects: Optional[RejectsCallback] = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]]:
  """Reads the CleanNet authors' feature TSV in vectorised chunks.

  Each line is ``key \\t class_name \\t verification \\t f1,f2,...,fD``; there
  is no header.

  Args:
    path: the TSV file.
    class_names: L names; a row's class id is its name's index.
    dim: expected feature width; None takes it from the first row whose first
      three columns are good.
    chunk_rows: lines per chunk; bounds memory.
    rejects: None to raise on the first bad line; else called as
      ``rejects(path, line_no, raw_line, reason)`` for every bad line, which
      is then skipped.

  Yields:
    (keys, features, class_ids, verification, first_row): bytes array [n],
    float32 [n, D], int64 [n], int64 [n], and the 1-based line number of the
    chunk's first row. With `rejects`, later rows of a chunk need not be on
    consecutive lines; they have passed every check FeatureWriter.write does.

  Raises:
    InputError: ``path:line: reason`` for the first bad line when `rejects` is
      None; ``path: no rows`` for a file with no lines.
  """
  path = os.fspath(path)
  name_to_id = {name: i for i, name in enumerate(class_names)}
  found_rows = False
  try:
    f = open(path, "rb")
  except OSError as e:
    raise InputError(f"{path}: cannot read ({e.strerror})") from e
  with f:
    first_line = 1
    while True:
      raw = list(itertools.islice(f, chunk_rows))
      if not raw:
        break
      found_rows = True
      chunk, dim = _parse_tsv_chunk(path, raw, first_line, name_to_id, dim,
                                    rejects)
      if chunk is not None:
        yield chunk
      first_line += len(raw)
  if not found_rows:
    raise InputError(f"{path}: no rows")


def _parse_tsv_chunk(path, raw, first_line, name_to_id, dim, rejects):
  """Parses one chunk of raw TSV lines; see read_authors_tsv.

  Returns:
    (chunk or None if no row is good, dim as known after this chunk).
  """
  n = len(raw)
  joined = b"".join(raw)
  lines, undecodable = _decode_lines(joined, raw)
  tab = np.array("\t", dtype=_STR)
  keys, _, rest = np.strings.partition(lines, tab)
  names, _, rest = np.strings.partition(rest, tab)
  labels, _, fields = np.strings.partition(rest, tab)
  data = np.frombuffer(joined, dtype=np.uint8)
  ends = np.cumsum(np.fromiter(map(len, raw), np.int64, n))
  num_columns = _count_per_line(data, ends, "\t") + 1
  class_ids = _lookup(names, name_to_id, -1)
  verification = _lookup(labels, _verification_table(labels), 2)
  # Commas in the whole line minus those in the (short) leading columns.
  widths = (_count_per_line(data, ends, ",") + 1
            - np.strings.count(keys, ",") - np.strings.count(names, ",")
            - np.strings.count(labels, ","))

  # Each row gets the code of the first check it fails; later checks only
  # overwrite rows that are still _OK.
  code = np.zeros(n, dtype=np.int8)
  for reason, bad in ((_NOT_UTF8, undecodable),
                      (_COLUMNS, num_columns != _TSV_COLUMNS),
                      (_EMPTY_KEY, np.strings.str_len(keys) == 0),
                      (_UNKNOWN_CLASS, class_ids < 0),
                      (_BAD_LABEL, verification == 2)):
    code[(code == _OK) & bad] = reason
  if dim is None and (code == _OK).any():
    dim = int(widths[np.argmax(code == _OK)])
  if dim is not None:
    code[(code == _OK) & (widths != dim)] = _WIDTH

  parsed = np.flatnonzero(code == _OK)
  values, unparsable = _parse_floats(fields[parsed], dim or 0)
  code[parsed[unparsable]] = _UNPARSABLE
  finite = np.isfinite(values)
  code[parsed[~unparsable & ~finite.all(axis=1)]] = _NON_FINITE

  def reason(i: int) -> str:
    c = code[i]
    if c == _NOT_UTF8:
      return "not valid UTF-8"
    if c == _COLUMNS:
      return (f"expected {_TSV_COLUMNS} tab-separated columns (key, class, "
              f"verification, features), got {num_columns[i]}")
    if c == _EMPTY_KEY:
      return "empty key"
    if c == _UNKNOWN_CLASS:
      return f"unknown class name {str(names[i])!r}"
    if c == _BAD_LABEL:
      return f"verification label {str(labels[i])!r} not in {{-1, 0, 1}}"
    if c == _WIDTH:
      return f"feature width {widths[i]}, expected {dim}"
    if c == _UNPARSABLE:
      return f"unparsable feature value {_first_bad_token(str(fields[i]))!r}"
    row = values[np.searchsorted(parsed, i)]
    j = int(np.argmin(np.isfinite(row)))
    return f"feature {j} is {row[j]}"

  bad_rows = np.flatnonzero(code != _OK)
  if bad_rows.size:
    if rejects is None:
      i = int(bad_rows[0])
      raise InputError(f"{path}:{first_line + i}: {reason(i)}")
    for i in bad_rows.tolist():
      rejects(path, first_line + i, str(lines[i]), reason(i))
  keep = code == _OK
  if not keep.any():
    return None, dim
  chunk = (np.strings.encode(keys[keep], "utf-8"), values[keep[parsed]],
           class_ids[keep], verification[keep],
           first_line + int(np.argmax(keep)))
  return chunk, dim


def convert_tsv(tsv_paths, class_names: Sequence[str], out_dir,
                rows_per_shard: int = 100_000,
                rejects_path=None) -> FeatureSetInfo:
  """Streams authors' TSV files (see read_authors_tsv) into a feature set.

  Args:
    tsv_paths: a path or a sequence of paths; rows keep their file order.
    class_names: L names; index = class id.
    out_dir: the feature set directory to write.
    rows_per_shard: rows per TFRecord shard.
    rejects_path: None to fail on the first bad line; else bad lines are
      skipped and listed in this TSV file as ``path \\t line \\t reason \\t
      raw_line`` (written atomically at the end, even if it is empty).

  Returns:
    The written feature set's info.

  Raises:
    InputError: a bad line (without `rejects_path`), an empty file, or no
      good rows at all.
  """
  if isinstance(tsv_paths, (str, os.PathLike)):
    tsv_paths = [tsv_paths]
  class_names = check_class_names(class_names, "<class_names>")
  rejects_file = rejects_tmp = None
  rejects = None
  if rejects_path is not None:
    rejects_path = os.fspath(rejects_path)
    fd, rejects_tmp = tempfile.mkstemp(
        dir=os.path.dirname(os.path.abspath(rejects_path)),
        prefix="." + os.path.basename(rejects_path) + ".", suffix=_TMP_SUFFIX)
    # Streamed to disk so that many rejects do not pile up in memory.
    rejects_file = os.fdopen(fd, "w", encoding="utf-8")

    def rejects(path, line, raw_line, reason):
      rejects_file.write(f"{path}\t{line}\t{reason}\t{raw_line}\n")

  try:
    with contextlib.ExitStack() as stack:
      writer = None
      for tsv_path in tsv_paths:
        dim = writer.dim if writer is not None else None
        for keys, features, class_ids, verification, first_row in (
            read_authors_tsv(tsv_path, class_names, dim=dim,
                             rejects=rejects)):
          if writer is None:
            # The width is known only once the first good row is parsed.
            writer = stack.enter_context(FeatureWriter(
                out_dir, features.shape[1], class_names, rows_per_shard))
          writer.write(keys, features, class_ids, verification,
                       source=os.fspath(tsv_path), first_row=first_row)
      if rejects_file is not None:
        # Written before the feature set so it survives a "no rows" failure.
        rejects_file.close()
        os.replace(rejects_tmp, rejects_path)
        rejects_tmp = None
      if writer is None:
        raise InputError(f"{', '.join(map(os.fspath, tsv_paths))}: no rows")
      return writer.close()
  finally:
    if rejects_file is not None:
      rejects_file.close()
    if rejects_tmp is not None:
      _remove_quietly(rejects_tmp)


def _feature_spec(dim: int) -> dict:
  return {
      "key": tf.io.FixedLenFeature([], tf.string),
      "features": tf.io.FixedLenFeature([dim], tf.float32),
      "class_id": tf.io.FixedLenFeature([], tf.int64),
      "verification": tf.io.FixedLenFeature([], tf.int64),
  }


def _batched_dataset(info: FeatureSetInfo, verification: str,
                     batch_size: int, with_source: bool) -> tf.data.Dataset:
  """Parsed, filtered batches (of varying size) of rows, in row order."""
  if verification not in VERIFICATION_FILTERS:
    raise InputError(f"verification={verification!r}: expected one of "
                     f"{', '.join(VERIFICATION_FILTERS)}")
  spec = _feature_spec(info.dim)

  def parse(path, batch_index, serialized):
    rows = tf.io.parse_example(serialized, spec)
    if with_source:
      n = tf.shape(serialized, out_type=tf.int64)[0]
      rows["source"] = tf.fill([n], path)
      rows["row"] = batch_index * batch_size + tf.range(n, dtype=tf.int64)
    if verification != "all":
      # Filtering whole batches keeps the per-row work out of tf.data.
      if verification == "verified":
        mask = rows["verification"] >= 0
      else:
        mask = rows["verification"] < 0
      rows = {k: tf.boolean_mask(v, mask) for k, v in rows.items()}
    return rows

  def read_shard(path):
    batches = tf.data.TFRecordDataset(path).batch(batch_size).enumerate()
    return batches.map(lambda i, s: parse(path, i, s),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  if len(info.shard_num_rows) == len(info.shard_paths):
    # A block at least as long as any shard makes the interleave take each
    # shard whole before the next, so rows come in file order while the next
    # shards are already being read and parsed in parallel.
    block_length = max(-(-rows // batch_size) for rows in info.shard_num_rows)
    cycle_length = min(len(info.shard_paths), 4)
  else:
    # Shard sizes unknown (an info built by hand): read shards one by one.
    block_length = cycle_length = 1
  return tf.data.Dataset.from_tensor_slices(list(info.shard_paths)).interleave(
      read_shard, cycle_length=cycle_length, block_length=block_length,
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def feature_dataset(info: FeatureSetInfo, verification: str = "all",
                    with_source: bool = False) -> tf.data.Dataset:
  """Streams a feature set's rows, unbatched, in file order.

  Args:
    info: from read_info.
    verification: "all", "verified" (verification 0 or 1) or "unverified"
      (verification -1).
    with_source: also yield "source" (tf.string, the shard path) and "row"
      (tf.int64, 0-based index within the shard) to name rows in errors.

  Returns:
    Dataset of dicts: "key" tf.string [], "features" tf.float32 [D],
    "class_id" tf.int64 [], "verification" tf.int64 [] (+ the source fields).
  """
  return _batched_dataset(info, verification, 1024, with_source).unbatch()


def load_arrays(info: FeatureSetInfo, verification: str = "verified",
                batch_size: int = 8192) -> dict[str, np.ndarray]:
  """Loads the selected rows into memory (meant for the few verified rows).

  Returns:
    {"key": object [n] of bytes, "features": float32 [n, D], "class_id":
    int64 [n], "verification": int64 [n]}, rows in file order.
  """
  batches = list(_batched_dataset(info, verification, batch_size,
                                  with_source=False).as_numpy_iterator())
  if not batches:
    return {"key": np.zeros([0], dtype=object),
            "features": np.zeros([0, info.dim], dtype=np.float32),
            "class_id": np.zeros([0], dtype=np.int64),
            "verification": np.zeros([0], dtype=np.int64)}
  return {name: np.concatenate([batch[name] for batch in batches])
          for name in batches[0]}
