"""Image inputs: manifests, class folders and TFDS, and the decoding pipeline.

An *image source* is a fixed, ordered list of N rows, each an image with a key,
a noisy class id and a verification label (1 = noisy label correct, 0 =
mislabelled, -1 = unknown). Three kinds exist:

* a CSV or TSV manifest with a header naming the columns ``path``, ``label``
  (class name, or class id when no name matches) and optionally
  ``verification`` and ``key`` (default: the path as written);
* a folder tree with one sub-folder per class (``folder_manifest``);
* a TensorFlow Datasets split (``tfds_source``), e.g. ``cifar10_n`` with
  ``label_key="worse_label"``; its rows have verification -1.

Rows are addressed by their 0-based index, so that a range of rows can be
handed to one machine and a failed row can be read again on its own.

Unreadable images do not stop a job. The pipeline decodes in parallel inside
the tf.data graph, where a read or decode error cannot be caught per element,
so failed elements are dropped with ``ignore_errors`` and each batch carries
the row indices it holds. After the pass, the rows that never arrived (rare)
are read once more eagerly, where the error is caught and its message becomes
the reason in the rejects file (``rejected_rows``). The hot path stays free of
Python (no ``py_function``), and no reason is lost.
"""

import csv
import dataclasses
import os
import re
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from cleannet_tf import data
from cleannet_tf.errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
REJECTS_COLUMNS = ("key", "path", "reason")
_STR = np.dtypes.StringDType()


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSource:
  """N labelled images; subclasses say where the encoded bytes come from.

  Attributes:
    description: names the source in messages (a file, folder or TFDS split).
    class_names: L names; index = class id.
    num_rows: N.
  """
  description: str
  class_names: tuple[str, ...]
  num_rows: int

  def records(self, start: int = 0, stop: Optional[int] = None
              ) -> tf.data.Dataset:
    """Rows [start, stop) in order, before decoding.

    Returns:
      Dataset of dicts: "index" int64 [], "key" string [], "path" string []
      (where the image is, for the rejects file), "encoded" string [] (image
      bytes, or "" when ``encoded_bytes`` reads them from "path"), "class_id"
      int64 [], "verification" int64 [].
    """
    raise NotImplementedError

  def encoded_bytes(self, record: dict) -> tf.Tensor:
    """The encoded image of one record, string []."""
    return record["encoded"]

  def _range(self, start: int, stop: Optional[int]) -> tuple[int, int]:
    stop = self.num_rows if stop is None else min(stop, self.num_rows)
    if not 0 <= start <= stop:
      raise InputError(f"{self.description}: bad row range [{start}, {stop})")
    return start, stop


@dataclasses.dataclass(frozen=True, eq=False)
class ManifestSource(ImageSource):
  """Images in files, listed in arrays of N rows.

  Attributes:
    keys: StringDType [N], unique.
    paths: StringDType [N], absolute or URLs (tf.io.gfile schemes).
    class_ids: int64 [N] in [0, L).
    verification: int64 [N] in {-1, 0, 1}.
  """
  keys: np.ndarray = None
  paths: np.ndarray = None
  class_ids: np.ndarray = None
  verification: np.ndarray = None

  def records(self, start=0, stop=None):
    start, stop = self._range(start, stop)
    return tf.data.Dataset.from_tensor_slices({
        "index": np.arange(start, stop, dtype=np.int64),
        "key": self.keys[start:stop].astype(object),
        "path": self.paths[start:stop].astype(object),
        "encoded": np.full(stop - start, b"", dtype=object),
        "class_id": self.class_ids[start:stop],
        "verification": self.verification[start:stop]})

  def encoded_bytes(self, record):
    return tf.io.read_file(record["path"])


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsSource(ImageSource):
  """A TFDS split read with its images left encoded (decoded by our pipeline).

  Attributes:
    dataset: the split as loaded, with ``SkipDecoding`` on the image feature.
    image_key, label_key: feature names of the image and the noisy label.
  """
  dataset: tf.data.Dataset = None
  image_key: str = "image"
  label_key: str = "label"

  def records(self, start=0, stop=None):
    start, stop = self._range(start, stop)
    prefix = self.description + "["

    def record(index, example):
      location = tf.strings.join([prefix, tf.strings.as_string(index), "]"])
      return {"index": index, "key": location, "path": location,
              "encoded": example[self.image_key],
              "class_id": tf.cast(example[self.label_key], tf.int64),
              "verification": tf.constant(-1, tf.int64)}

    # skip() only reads records here: images are still encoded, so it is cheap.
    return (self.dataset.enumerate().skip(start).take(stop - start)
            .map(record, num_parallel_calls=tf.data.AUTOTUNE))


def _resolve_labels(labels: np.ndarray, class_names: Optional[Sequence[str]],
                    source: str) -> tuple[tuple[str, ...], np.ndarray]:
  """Class names and int64 ids [n] for label strings [n].

  A label is a class name, or, if it names no class, a class id. Without
  `class_names`, integer labels are ids (names "0".."max") and other labels
  give the sorted unique labels as names. Errors name ``source:line``.
  """
  unique, inverse = np.unique(labels, return_inverse=True)
  unique = unique.tolist()  # few distinct labels: a Python loop over them is cheap
  numeric = all(u.isdigit() for u in unique)
  if class_names is None:
    if numeric:
      class_names = [str(i) for i in range(max(map(int, unique)) + 1)]
    else:
      class_names = unique
  names = data.check_class_names(class_names, "<class names>")
  by_name = {name: i for i, name in enumerate(names)}
  ids = np.empty(len(unique), np.int64)
  for j, label in enumerate(unique):
    if label in by_name:
      ids[j] = by_name[label]
    elif label.isdigit() and int(label) < len(names):
      ids[j] = int(label)
    else:
      line = int(np.argmax(inverse == j)) + 2
      raise InputError(f"{source}:{line}: label {label!r} is neither one of the "
                       f"{len(names)} class names nor a class id")
  return names, ids[inverse]


def _read_table(path: str) -> tuple[list[str], list[list[str]]]:
  """Header and rows of a CSV or TSV file (by extension, else sniffed)."""
  try:
    with open(path, newline="", encoding="utf-8") as f:
      text = f.read()
  except OSError as e:
    raise InputError(f"{path}: cannot read manifest ({e.strerror})") from e
  except UnicodeDecodeError as e:
    raise InputError(f"{path}: manifest is not UTF-8 ({e.reason})") from e
  extension = os.path.splitext(path)[1].lower()
  if extension in (".tsv", ".tab"):
    delimiter = "\t"
  elif extension == ".csv":
    delimiter = ","
  else:
    header = text.split("\n", 1)[0]
    delimiter = "\t" if "\t" in header else ","
  rows = list(csv.reader(text.splitlines(), delimiter=delimiter))
  if not rows:
    raise InputError(f"{path}: empty manifest")
  return [name.strip() for name in rows[0]], rows[1:]


def read_manifest(path, class_names: Optional[Sequence[str]] = None
                  ) -> ManifestSource:
  """Reads a CSV/TSV manifest (see the module docstring for its columns).

  Relative paths are resolved against the manifest's folder. Line numbers in
  errors assume one line per row (no quoted newlines).

  Args:
    path: the manifest file.
    class_names: class names, index = class id (e.g. from a ``classes.txt``);
      default: derived from the labels (see ``_resolve_labels``).

  Raises:
    InputError: naming ``path:line`` for a missing column, a short row, an
      empty path or key, a duplicate key, an unknown label or a verification
      outside {-1, 0, 1} (empty means -1).
  """
  path = os.fspath(path)
  header, rows = _read_table(path)
  missing = {"path", "label"} - set(header)
  if missing:
    raise InputError(f"{path}:1: header lacks column(s) {sorted(missing)}; "
                     f"found {header}")
  if not rows:
    raise InputError(f"{path}: no rows after the header")
  widths = np.fromiter(map(len, rows), np.int64, len(rows))
  short = np.flatnonzero(widths < len(header))
  if short.size:
    raise InputError(f"{path}:{short[0] + 2}: {widths[short[0]]} columns, "
                     f"header has {len(header)}")
  table = np.array([row[:len(header)] for row in rows], dtype=_STR)
  column = {name: np.strings.strip(table[:, i])
            for i, name in enumerate(header)}

  paths = column["path"]
  empty = np.flatnonzero(np.strings.str_len(paths) == 0)
  if empty.size:
    raise InputError(f"{path}:{empty[0] + 2}: empty path")
  keys = column.get("key", paths)
  empty = np.flatnonzero(np.strings.str_len(keys) == 0)
  if empty.size:
    raise InputError(f"{path}:{empty[0] + 2}: empty key")
  _, first, counts = np.unique(keys, return_index=True, return_counts=True)
  if (counts > 1).any():
    dup = np.flatnonzero(np.isin(keys, keys[first[counts > 1]]))
    raise InputError(f"{path}:{dup[1] + 2}: duplicate key {str(keys[dup[1]])!r} "
                     f"(first on line {dup[0] + 2})")

  names, class_ids = _resolve_labels(column["label"], class_names, path)
  verification = np.full(len(rows), -1, np.int64)
  if "verification" in column:
    text = column["verification"]
    valid = np.isin(text, ["", "-1", "0", "1"])
    if not valid.all():
      line = int(np.argmin(valid)) + 2
      raise InputError(f"{path}:{line}: verification "
                       f"{str(text[line - 2])!r} not in {{-1, 0, 1}}")
    given = np.strings.str_len(text) > 0
    verification[given] = text[given].astype(np.int64)

  # URLs (gs://...) and absolute paths stand; others are relative to the file.
  absolute = (np.strings.startswith(paths, "/")
              | (np.strings.find(paths, "://") >= 0))
  folder = os.path.dirname(os.path.abspath(path)) + os.sep
  paths = np.where(absolute, paths, np.strings.add(folder, paths))
  return ManifestSource(description=path, class_names=names,
                        num_rows=len(rows), keys=keys, paths=paths,
                        class_ids=class_ids, verification=verification)


def folder_manifest(root, class_names: Optional[Sequence[str]] = None
                    ) -> ManifestSource:
  """One sub-folder per class, images inside (any depth); verification -1.

  Args:
    root: the folder whose sub-folders are classes.
    class_names: which sub-folders, in class-id order; default: all, sorted.

  Returns:
    A ManifestSource in sorted path order; keys are paths relative to root.
  """
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise InputError(f"{root}: not a folder")
  if class_names is None:
    class_names = sorted(entry.name for entry in os.scandir(root)
                         if entry.is_dir())
  names = data.check_class_names(class_names, root)
  keys, class_ids = [], []
  for class_id, name in enumerate(names):
    folder = os.path.join(root, name)
    if not os.path.isdir(folder):
      raise InputError(f"{folder}: class folder missing")
    found = sorted(
        os.path.relpath(os.path.join(directory, file), root)
        for directory, _, files in os.walk(folder) for file in files
        if file.lower().endswith(IMAGE_EXTENSIONS))
    keys += found
    class_ids += [class_id] * len(found)
  if not keys:
    raise InputError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in "
                     "class folders")
  keys = np.array(keys, dtype=_STR)
  return ManifestSource(
      description=root, class_names=names, num_rows=len(keys), keys=keys,
      paths=np.strings.add(os.path.abspath(root) + os.sep, keys),
      class_ids=np.array(class_ids, np.int64),
      verification=np.full(len(keys), -1, np.int64))


def tfds_source(name: str, split: str = "train", label_key: str = "label",
                data_dir: Optional[str] = None, image_key: str = "image"
                ) -> TfdsSource:
  """A TFDS split as an image source (prepared by TFDS if needed).

  For CIFAR-10N use ``name="cifar10_n"`` and ``label_key`` one of
  ``worse_label``, ``aggre_label``, ``random_label1..3`` (``label`` is the
  clean CIFAR-10 label there, not a noisy one). Keys are ``name/split[i]``.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  description = f"{name}/{split}"
  try:
    dataset, info = tfds.load(
        name, split=split, data_dir=data_dir, with_info=True,
        shuffle_files=False, decoders={image_key: tfds.decode.SkipDecoding()})
  except Exception as e:  # TFDS raises many types (registry, download, split).
    raise InputError(f"--tfds={name}: cannot load split {split!r}: "
                     f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                     ) from e
  if label_key not in info.features or image_key not in info.features:
    raise InputError(f"--tfds={name}: features are {sorted(info.features)}; "
                     f"no {label_key!r} or {image_key!r}")
  class_names = tuple(info.features[label_key].names)
  num_rows = int(dataset.cardinality())
  if num_rows < 0:
    # Unknown length (should not happen for prepared splits): count records.
    num_rows = int(dataset.reduce(np.int64(0), lambda n, _: n + 1))
  return TfdsSource(description=description, class_names=class_names,
                    num_rows=num_rows, dataset=dataset, image_key=image_key,
                    label_key=label_key)


def decode(encoded: tf.Tensor, image_size: Sequence[int]) -> tf.Tensor:
  """Encoded JPEG/PNG/GIF/BMP/WebP -> float32 [H, W, 3] pixels in [0, 255]."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image = tf.image.resize(image, image_size)  # bilinear; float32 out
  return tf.ensure_shape(image, [*image_size, 3])


def image_dataset(source: ImageSource, image_size: Sequence[int],
                  batch_size: int, start: int = 0,
                  stop: Optional[int] = None) -> tf.data.Dataset:
  """Decoded batches of rows [start, stop), in row order, failures dropped.

  Reads and decodes in parallel (deterministic order), then batches and
  prefetches. Rows whose image cannot be read or decoded are missing from
  the batches; ``rejected_rows`` says which and why.

  Returns:
    Dataset of dicts: "index" int64 [B], "key" string [B], "image" float32
    [B, H, W, 3] in [0, 255], "class_id" int64 [B], "verification" int64 [B].
  """
  image_size = tuple(image_size)

  def load(record):
    return {"index": record["index"], "key": record["key"],
            "image": decode(source.encoded_bytes(record), image_size),
            "class_id": record["class_id"],
            "verification": record["verification"]}

  return (source.records(start, stop)
          .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .ignore_errors()  # the reason is recovered by rejected_rows
          .batch(batch_size)
          .prefetch(tf.data.AUTOTUNE))


def _short_error(message: str) -> str:
  """An op error's message without TensorFlow's function/op decorations."""
  message = re.sub(r"\{\{function_node [^}]*\}\}", "", message)
  message = re.sub(r"\[Op:\w+\].*$", "", message, flags=re.DOTALL)
  return " ".join(message.split())


def rejected_rows(source: ImageSource, image_size: Sequence[int],
                  indices: Sequence[int]) -> list[tuple[str, str, str]]:
  """(key, path, reason) for rows that a pipeline dropped.

  Each row is read and decoded again eagerly to catch its error; rows that
  now succeed (a transient read error) say so, since they were not written.
  """
  rejects = []
  for index in indices:  # failures only: rare, so a Python loop is fine
    record = next(iter(source.records(int(index), int(index) + 1)))
    try:
      decode(source.encoded_bytes(record), tuple(image_size))
      reason = "read failed in the pipeline but succeeded on retry; rerun"
    except (tf.errors.OpError, ValueError) as e:
      reason = _short_error(getattr(e, "message", str(e)))
    rejects.append((record["key"].numpy().decode("utf-8"),
                    record["path"].numpy().decode("utf-8"), reason))
  return rejects


def write_rejects(path: str, rejects: Sequence[tuple[str, str, str]]) -> None:
  """Writes a rejects TSV (header ``key path reason``) atomically."""
  lines = ["\t".join(REJECTS_COLUMNS)]
  # Tabs/newlines inside a field would break the TSV columns.
  lines += ["\t".join(" ".join(field.split()) for field in row)
            for row in rejects]
  data.atomic_write_text(path, "\n".join(lines) + "\n")


def read_rejects(path: str) -> list[tuple[str, str, str]]:
  """Rows of a rejects TSV written by ``write_rejects``."""
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()[1:]
  return [tuple(line.split("\t")) for line in lines]
