"""Feature extraction (f_v) from images into feature sets, split across machines.

The rows of an image source are cut into ``num_shards`` contiguous ranges:
part i takes rows [floor(N i / S), floor(N (i + 1) / S)), so concatenating
the parts in order gives the source's row order. Each part is written as a
complete feature set in ``<out>/part-<i>-of-<S>/`` (5-digit numbers), whose
``metadata.json`` appears last (see ``data.FeatureWriter``): a part with it is
finished and a rerun skips it, a part without it is redone from scratch. Any
number of machines can run disjoint (or even overlapping: last writer wins,
same content) ``shard_index`` values against a shared ``<out>``.

Each part also gets ``rejects.tsv`` (``key \\t path \\t reason``) for rows
whose image could not be read or decoded; every other row is written.
``merge_feature_sets`` then presents the finished parts as one feature set by
hard-linking their shard files (no copy).
"""

import json
import os
import shutil
import time
from typing import Optional, Sequence

from absl import logging
import keras
import numpy as np
import tensorflow as tf

# backbones registers the custom layers that saved feature extractors use.
from cleannet_tf import backbones, data, images  # pylint: disable=unused-import
from cleannet_tf.errors import InputError

REJECTS_FILE = "rejects.tsv"


def part_directory(out_dir: str, index: int, num_shards: int) -> str:
  """``<out_dir>/part-<index>-of-<num_shards>``."""
  return os.path.join(out_dir, f"part-{index:05d}-of-{num_shards:05d}")


def shard_range(num_rows: int, index: int, num_shards: int) -> tuple[int, int]:
  """Rows [start, stop) of part `index` of `num_shards` (contiguous)."""
  return num_rows * index // num_shards, num_rows * (index + 1) // num_shards


def is_finished(directory: str) -> bool:
  """Whether a part's write completed (``metadata.json`` is written last)."""
  return os.path.isfile(os.path.join(directory, data.METADATA_FILE))


def extract_part(source: images.ImageSource, extractor: keras.Model,
                 directory: str, start: int, stop: int, batch_size: int = 256,
                 rows_per_shard: int = 100_000, log_every: int = 50
                 ) -> data.FeatureSetInfo:
  """Extracts rows [start, stop) of `source` into the feature set `directory`.

  Memory holds a few batches of images and one of features; rejects are
  written to ``directory/rejects.tsv`` before the set is closed.

  Args:
    extractor: float [B, H, W, 3] pixels in [0, 255] -> [B, D] features.
    log_every: log images/s every this many batches.

  Raises:
    InputError: no row of the range could be read (see its rejects file).
  """
  image_size = tuple(extractor.input_shape[1:3])
  dim = int(extractor.output_shape[-1])
  embed = tf.function(
      lambda x: tf.cast(extractor(x, training=False), tf.float32),
      reduce_retracing=True)
  seen = np.zeros(stop - start, dtype=bool)
  started = time.time()
  with data.FeatureWriter(directory, dim, source.class_names,
                          rows_per_shard) as writer:
    for batch_number, batch in enumerate(images.image_dataset(
        source, image_size, batch_size, start, stop), start=1):
      features = embed(batch["image"]).numpy()
      index = batch["index"].numpy()
      seen[index - start] = True
      writer.write(batch["key"].numpy(), features, batch["class_id"].numpy(),
                   batch["verification"].numpy(), source=source.description,
                   first_row=int(index[0]) + 1)
      if batch_number % log_every == 0:
        done = int(seen.sum())
        logging.info("%s: %d/%d images, %.1f images/s", directory, done,
                     stop - start, done / max(time.time() - started, 1e-9))
    rejects = images.rejected_rows(source, image_size,
                                   start + np.flatnonzero(~seen))
    images.write_rejects(os.path.join(directory, REJECTS_FILE), rejects)
    if rejects:
      logging.warning("%s: %d of %d images rejected, see %s", directory,
                      len(rejects), stop - start, REJECTS_FILE)
    if not seen.any():
      raise InputError(f"{source.description}: no readable image in rows "
                       f"{start + 1}..{stop}; see "
                       f"{os.path.join(directory, REJECTS_FILE)}")
    info = writer.close()
  elapsed = max(time.time() - started, 1e-9)
  logging.info("%s: %d images in %.1f s, %.1f images/s", directory,
               info.num_rows, elapsed, info.num_rows / elapsed)
  return info


def extract_features(source: images.ImageSource, extractor: keras.Model,
                     out_dir: str, num_shards: int = 1,
                     shard_indices: Optional[Sequence[int]] = None,
                     **kwargs) -> list[str]:
  """Extracts the given parts (default: all) that are not finished yet.

  Args:
    num_shards: S, parts the rows are cut into (at most N).
    shard_indices: which parts this process does; default all of 0..S-1.
    **kwargs: passed to ``extract_part``.

  Returns:
    The directories of the requested parts, in part order.
  """
  if not 1 <= num_shards <= source.num_rows:
    raise InputError(f"--num_shards={num_shards}: must be in [1, "
                     f"{source.num_rows}] (rows of {source.description})")
  if shard_indices is None:
    shard_indices = range(num_shards)
  for index in shard_indices:
    if not 0 <= index < num_shards:
      raise InputError(f"--shard_index={index}: must be in [0, {num_shards})")
  directories = []
  for index in shard_indices:
    directory = part_directory(out_dir, index, num_shards)
    directories.append(directory)
    if is_finished(directory):
      logging.info("%s: finished earlier, skipped", directory)
      continue
    start, stop = shard_range(source.num_rows, index, num_shards)
    extract_part(source, extractor, directory, start, stop, **kwargs)
  return directories


def merge_feature_sets(part_dirs: Sequence[str], out_dir: str
                       ) -> data.FeatureSetInfo:
  """One feature set over the parts' rows, in the given order, without copying.

  Shard files are hard-linked into `out_dir` (copied where linking fails,
  e.g. across file systems); the parts' rejects files are concatenated into
  ``out_dir/rejects.tsv``. ``metadata.json`` is written last.

  Raises:
    InputError: a part is unfinished, or parts disagree on width or classes.
  """
  infos = [data.read_info(directory) for directory in part_dirs]
  if not infos:
    raise InputError(f"{out_dir}: no parts to merge")
  first = infos[0]
  for info in infos[1:]:
    if (info.dim, info.class_names) != (first.dim, first.class_names):
      raise InputError(f"{info.directory}: feature width or class names differ "
                       f"from {first.directory}'s")
  os.makedirs(out_dir, exist_ok=True)
  meta_path = os.path.join(out_dir, data.METADATA_FILE)
  if os.path.exists(meta_path):
    os.remove(meta_path)  # the set reads as unfinished until rewritten
  shards = []
  for info in infos:
    for path, rows in zip(info.shard_paths, info.shard_num_rows):
      name = f"features-{len(shards):05d}.tfrecord"
      target = os.path.join(out_dir, name)
      if os.path.exists(target):
        os.remove(target)
      try:
        os.link(path, target)
      except OSError:
        shutil.copyfile(path, target)
      shards.append({"file": name, "num_rows": rows})
  rejects = []
  for info in infos:
    rejects_path = os.path.join(info.directory, REJECTS_FILE)
    if os.path.isfile(rejects_path):
      rejects += images.read_rejects(rejects_path)
  images.write_rejects(os.path.join(out_dir, REJECTS_FILE), rejects)
  data.write_class_names(os.path.join(out_dir, data.CLASSES_FILE),
                         first.class_names)
  metadata = {
      "format": data.FORMAT, "dim": first.dim,
      "num_classes": first.num_classes,
      "num_rows": sum(info.num_rows for info in infos),
      "shards": shards,
      "class_counts": sum(info.class_counts for info in infos).tolist(),
  }
  data.atomic_write_text(meta_path, json.dumps(metadata, indent=1) + "\n")
  return data.read_info(out_dir)


def load_feature_extractor(path: str) -> keras.Model:
  """Loads a saved ``feature_extractor.keras`` (f_v of ``classifier``)."""
  if not os.path.isfile(path):
    raise InputError(f"--feature_extractor: {path}: no such file")
  return keras.models.load_model(path, compile=False)
