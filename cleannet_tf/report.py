"""A self-contained HTML review report for a scored data set (issue 7).

``write_report`` turns a model, its feature set and the score TSVs written by
``scoring.score_feature_set`` into one folder that opens offline in a browser:

* ``index.html``: the classes sorted by their estimated noise rate (share of
  rows scoring below delta), with the measured rate beside it where verified
  rows or clean labels are known, a small score histogram per class, the
  "verify next" list and the images that could not be read;
* ``class-NNNNN.html``, one per class: the score histogram with delta marked,
  the lowest-scored rows (the suspects), the highest-scored rows, and the
  references with the most and the least attention (paper Fig. 3). References
  are K-means centroids, not images, so each is shown as the class member
  nearest to it in feature space;
* ``verify_next.csv``: the rows whose verification would help most, as a
  manifest (``key,path,label,verification``) with ``verification`` left empty
  to be filled in with 1 (label correct) or 0 (mislabeled);
* ``unreadable.csv``: the shown rows whose image is missing from the manifest
  or cannot be read or decoded (placeholders in the pages);
* ``thumbs/``: small JPEG thumbnails of the images shown.

Delta here is each class's threshold (``scoring.class_thresholds``): the
model's delta, moved by its score quartiles for a class without verification
labels.

"Verify next" ranking: only unverified rows (verification -1) are candidates;
within a class they rank by |score - delta| ascending (the rows the model is
least sure about); the list then goes round-robin over classes (every class's
nearest row, then every class's second nearest, ...), taking all classes
without any verification label before the classes that have some, and within
one round by |score - delta|. The first ``verify_budget`` rows are listed.

Memory is bounded by classes x (per_class + verify_budget) plus one chunk, not
by rows: the score TSVs are streamed in chunks, keeping per class a fixed-bin
histogram and only the candidate rows; the feature set is streamed once to find
each reference's nearest member; the manifest is streamed once and only the
paths of shown rows are kept. Clean labels (``truth``) are the exception: they
are held as two arrays (keys and class ids) to join against the scores.
"""

import csv
import dataclasses
import hashlib
import html
import itertools
import os
import re
import shutil
import tempfile
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from cleannet_tf import data, scoring
from cleannet_tf.errors import InputError

HISTOGRAM_BINS = 40
THUMBNAIL_SIZE = 96
VERIFY_COLUMNS = ("key", "path", "label", "verification")
UNREADABLE_COLUMNS = ("key", "path", "reason")

_CHUNK_ROWS = 65536
# Bounds the [B, K, D] gather of reference centroids in the nearest-member pass.
_GATHER_FLOATS = 1 << 24
_STR = np.dtypes.StringDType()


def _searchable(strings):
  """Strings as an object array for sorting and searchsorted.

  NumPy's StringDType gives wrong np.searchsorted positions (seen with
  numpy 2.4), so every sorted look-up goes through Python str objects.
  """
  return np.asarray(strings).astype(object)
# np.strings ufuncs on StringDType arrays need StringDType separators too.
_TAB, _NEWLINE = np.array("\t", _STR), np.array("\r\n", _STR)
# Score columns read back, in file order: key, class_id, class_name,
# verification, score.
_SCORE_FIELDS = scoring.SCORE_COLUMNS.index("score") + 1

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px}
.lead{color:#555;margin:0 0 16px} .muted{color:#777}
table{border-collapse:collapse} th,td{padding:3px 8px;border-bottom:1px solid #eee;
text-align:left;vertical-align:middle} th{background:#f6f6f6;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:10px;background:#d9534f;vertical-align:middle}
.tag{font-size:11px;padding:1px 5px;border-radius:3px;background:#dff0d8;color:#2d662d}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:112px;font-size:11px;text-align:center}
figure img,.placeholder{width:96px;height:96px;object-fit:contain;background:#f3f3f3;
border:1px solid #ddd;display:block;margin:0 auto 2px}
.placeholder{display:flex;align-items:center;justify-content:center;color:#999;font-size:10px}
.key{word-break:break-all;color:#555} .low{color:#b52b27;font-weight:600}
.high{color:#2d662d;font-weight:600} svg text{font:10px sans-serif;fill:#555}
"""


@dataclasses.dataclass
class _Rows:
  """Columns of some score rows (one chunk, or the candidates kept so far)."""
  key: np.ndarray  # StringDType [n]
  class_id: np.ndarray  # int64 [n]
  verification: np.ndarray  # int64 [n]
  score: np.ndarray  # float64 [n]

  @classmethod
  def empty(cls):
    return cls(np.zeros([0], _STR), np.zeros([0], np.int64), np.zeros([0], np.int64),
               np.zeros([0], np.float64))

  def __len__(self):
    return len(self.score)

  def take(self, index):
    return _Rows(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

  @staticmethod
  def concatenate(parts):
    return _Rows(*(np.concatenate([getattr(part, f.name) for part in parts])
                   for f in dataclasses.fields(_Rows)))


def _rank_within_group(groups, values):
  """Each row's 0-based rank by ``values`` among the rows of its group.

  Ties rank in input order.
  """
  order = np.lexsort((values, groups))
  sorted_groups = groups[order]
  rank = np.empty(len(order), np.int64)
  rank[order] = np.arange(len(order)) - np.searchsorted(sorted_groups, sorted_groups)
  return rank


class _Candidates:
  """Per class, the ``n`` rows with the smallest ``value(rows)`` seen so far."""

  def __init__(self, n, value, keep=None):
    self.n, self.value, self.keep = n, value, keep
    self.rows = _Rows.empty()

  def add(self, chunk):
    if self.keep is not None:
      chunk = chunk.take(self.keep(chunk))
    # Kept rows go first, so on ties the earlier row stays.
    rows = _Rows.concatenate([self.rows, chunk])
    self.rows = rows.take(_rank_within_group(rows.class_id, self.value(rows)) < self.n)

  def of_class(self, class_id):
    """The kept rows of one class, best first."""
    rows = self.rows.take(self.rows.class_id == class_id)
    return rows.take(np.argsort(self.value(rows), kind="stable"))


@dataclasses.dataclass
class _Item:
  """One image shown in the report."""
  key: str
  caption: str
  thumbnail: Optional[str] = None  # path relative to the report folder
  problem: Optional[str] = None  # why there is no thumbnail


def _numbers(column, dtype, name, path, first_line):
  """Casts a string column; InputError names the first bad line."""
  try:
    return column.astype(dtype)
  except ValueError:
    # The error path only: find the first bad value for the message.
    for i, value in enumerate(column.tolist()):
      try:
        np.array([value], _STR).astype(dtype)
      except ValueError:
        raise InputError(f"{path}:{first_line + i}: {name} {value!r} is not a number"
                         ) from None
    raise


def _open(path, what, newline=""):
  try:
    return open(path, encoding="utf-8", newline=newline)
  except OSError as e:
    raise InputError(f"{path}: cannot read {what} ({e.strerror})") from None


def _score_chunks(path, num_classes):
  """Yields a score TSV (see scoring.SCORE_COLUMNS) as ``_Rows`` chunks."""
  # Only "\n" ends a row (scoring writes it), whatever else a key holds.
  with _open(path, "scores", newline="\n") as f:
    header = f.readline().rstrip("\n").split("\t")
    if header != list(scoring.SCORE_COLUMNS):
      raise InputError(f"{path}:1: expected the header {' '.join(scoring.SCORE_COLUMNS)}, "
                       f"got {' '.join(header)}")
    first_line = 2
    while lines := list(itertools.islice(f, _CHUNK_ROWS)):
      rest = np.strings.rstrip(np.array(lines, _STR), _NEWLINE)
      fields = []
      for _ in range(_SCORE_FIELDS):
        field, _, rest = np.strings.partition(rest, _TAB)
        fields.append(field)
      key, class_id, _, verification, score = fields
      class_id = _numbers(class_id, np.int64, "class_id", path, first_line)
      bad = (class_id < 0) | (class_id >= num_classes)
      if bad.any():
        i = int(np.argmax(bad))
        raise InputError(f"{path}:{first_line + i}: class_id {class_id[i]} outside "
                         f"[0, {num_classes})")
      yield _Rows(key, class_id,
                  _numbers(verification, np.int64, "verification", path, first_line),
                  _numbers(score, np.float64, "score", path, first_line))
      first_line += len(lines)


def _csv_chunks(path, required, optional=()):
  """Streams a CSV with a header as chunks of {column: StringDType [n]}.

  Yields:
    (columns, first_line): the present columns among `required` + `optional`,
    and the file line of the chunk's first row.
  """
  with _open(path, "the CSV") as f:
    reader = csv.reader(f)
    header = next(reader, [])
    missing = [name for name in required if name not in header]
    if missing:
      raise InputError(f"{path}:1: header {','.join(header)!r} lacks the column(s) "
                       f"{', '.join(missing)}")
    wanted = {name: header.index(name) for name in (*required, *optional) if name in header}
    first_line = 2
    while rows := list(itertools.islice(reader, _CHUNK_ROWS)):
      widths = np.fromiter(map(len, rows), np.int64, len(rows))
      if (widths != len(header)).any():
        i = int(np.argmax(widths != len(header)))
        raise InputError(f"{path}:{first_line + i}: {widths[i]} columns, the header has "
                         f"{len(header)}")
      table = np.array(rows, _STR).reshape(len(rows), len(header))
      yield {name: table[:, column] for name, column in wanted.items()}, first_line
      first_line += len(rows)


def _class_ids(labels, class_names, path, first_line):
  """Class names or ids (strings) -> int64 class ids; '' -> -1 (unknown)."""
  names = _searchable(np.array(class_names, _STR))
  order = np.argsort(names)
  position = np.minimum(np.searchsorted(names[order], _searchable(labels)), len(names) - 1)
  is_name = names[order][position] == _searchable(labels)
  ids = np.where(is_name, order[position], -1)
  numeric = ~is_name & np.strings.isdecimal(labels)
  ids[numeric] = labels[numeric].astype(np.int64)
  bad = (~is_name & ~numeric & (labels != "")) | (ids >= len(class_names))
  if bad.any():
    i = int(np.argmax(bad))
    raise InputError(f"{path}:{first_line + i}: clean label {str(labels[i])!r} is neither "
                     f"a class name nor a class id in [0, {len(class_names)})")
  return ids


class _Truth:
  """Clean labels by key, sorted for vectorised look-ups."""

  def __init__(self, keys, class_ids):
    keys = _searchable(keys)
    order = np.argsort(keys)
    self.keys, self.class_ids = keys[order], class_ids[order]

  @classmethod
  def read(cls, path, class_names, label_column):
    keys, ids = [np.zeros([0], _STR)], [np.zeros([0], np.int64)]
    for columns, first_line in _csv_chunks(path, ("key", label_column)):
      keys.append(columns["key"])
      ids.append(_class_ids(columns[label_column], class_names, path, first_line))
    return cls(np.concatenate(keys), np.concatenate(ids))

  def lookup(self, keys):
    """Clean class id of each key, -1 where unknown."""
    if not len(self.keys):
      return np.full(len(keys), -1)
    keys = _searchable(keys)
    position = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
    return np.where(self.keys[position] == keys, self.class_ids[position], -1)


@dataclasses.dataclass
class _ScoreStats:
  """Per-class counts and candidate rows from one streamed pass over the scores."""
  rows: np.ndarray  # [L]
  below_delta: np.ndarray  # [L]
  histogram: np.ndarray  # [L, HISTOGRAM_BINS]
  verified: np.ndarray  # [L], rows with verification 0 or 1
  verified_noisy: np.ndarray  # [L], rows with verification 0
  truth_known: np.ndarray  # [L]
  truth_noisy: np.ndarray  # [L]
  lowest: _Candidates
  highest: _Candidates
  near_delta: _Candidates


def _read_scores(score_paths, num_classes, thresholds, per_class, verify_budget, truth):
  """One streamed pass over the score TSVs -> _ScoreStats (thresholds: float [L])."""

  def zeros(*shape):
    return np.zeros((num_classes, *shape), np.int64)

  def count(class_ids, where):
    return np.bincount(class_ids[where], minlength=num_classes)

  stats = _ScoreStats(
      zeros(), zeros(), zeros(HISTOGRAM_BINS), zeros(), zeros(), zeros(), zeros(),
      lowest=_Candidates(per_class, lambda rows: rows.score),
      highest=_Candidates(per_class, lambda rows: -rows.score),
      near_delta=_Candidates(verify_budget,
                             lambda rows: np.abs(rows.score - thresholds[rows.class_id]),
                             keep=lambda rows: rows.verification < 0))
  for path in score_paths:
    for chunk in _score_chunks(path, num_classes):
      c = chunk.class_id
      stats.rows += np.bincount(c, minlength=num_classes)
      stats.below_delta += count(c, chunk.score < thresholds[c])
      bins = np.clip(((chunk.score + 1) / 2 * HISTOGRAM_BINS).astype(np.int64), 0,
                     HISTOGRAM_BINS - 1)
      stats.histogram += np.bincount(c * HISTOGRAM_BINS + bins, minlength=stats.histogram.size
                                     ).reshape(stats.histogram.shape)
      stats.verified += count(c, chunk.verification >= 0)
      stats.verified_noisy += count(c, chunk.verification == 0)
      if truth is not None:
        clean = truth.lookup(chunk.key)
        stats.truth_known += count(c, clean >= 0)
        stats.truth_noisy += count(c, (clean >= 0) & (clean != c))
      for candidates in (stats.lowest, stats.highest, stats.near_delta):
        candidates.add(chunk)
  return stats


def nearest_members(model, info, max_batch=4096):
  """For each reference of each class, the class member nearest to it.

  One streamed pass over the feature set: each batch gathers its rows' class
  centroids [B, K, D] and updates a running argmin per (class, reference).

  Returns:
    (keys StringDType [L, K], squared distance float [L, K]); '' and inf for
    padding references and for references of classes with no rows.
  """
  centroids = model.reference_features.numpy()
  num_classes, k, dim = centroids.shape
  real = np.arange(k) < model.reference_counts.numpy()[:, None]  # [L, K]
  centroid_norms = np.where(real, np.einsum("lkd,lkd->lk", centroids, centroids), np.inf)
  best = np.full((num_classes, k), np.inf)
  best_key = np.full((num_classes, k), "", _STR)
  batch_size = int(np.clip(_GATHER_FLOATS // (k * dim), 1, max_batch))
  for batch in data.feature_dataset(info).batch(batch_size).as_numpy_iterator():
    class_id, features = batch["class_id"], batch["features"]
    # |x - c|^2 = |c|^2 - 2 x.c + |x|^2; padding references have |c|^2 = inf.
    distance = (centroid_norms[class_id]
                - 2 * np.einsum("bd,bkd->bk", features, centroids[class_id])
                + np.einsum("bd,bd->b", features, features)[:, None])
    group = (class_id[:, None] * k + np.arange(k)).ravel()
    # The batch's nearest row per (class, reference).
    winner = np.flatnonzero(_rank_within_group(group, distance.ravel()) == 0)
    cell, value = group[winner], distance.ravel()[winner]
    better = value < best.flat[cell]
    best.flat[cell[better]] = value[better]
    keys = np.array([key.decode("utf-8") for key in batch["key"][winner[better] // k]], _STR)
    best_key.flat[cell[better]] = keys
  return best_key, best


def _read_paths(manifest, wanted):
  """Streams a manifest (``key,path``) keeping only the wanted keys' paths.

  Returns:
    {key: absolute image path}; relative paths are resolved against the
    manifest's folder. Without a ``key`` column the path is the key.
  """
  wanted = np.unique(_searchable(sorted(wanted)))
  folder = os.path.dirname(os.path.abspath(manifest))
  paths = {}
  for columns, _ in _csv_chunks(manifest, ("path",), ("key",)):
    keys = columns.get("key", columns["path"])
    hit = np.isin(_searchable(keys), wanted)
    paths.update(zip(keys[hit].tolist(),
                     (os.path.join(folder, path) for path in columns["path"][hit].tolist())))
  return paths


def _write_thumbnail(source, target):
  """Writes a JPEG thumbnail; returns None, or why the image cannot be read."""
  try:
    image = tf.io.decode_image(tf.io.read_file(source), channels=3, expand_animations=False)
    image = tf.image.resize(image, [THUMBNAIL_SIZE, THUMBNAIL_SIZE], preserve_aspect_ratio=True,
                            antialias=True)
    tf.io.write_file(target, tf.io.encode_jpeg(tf.cast(tf.round(image), tf.uint8), quality=85))
  except (tf.errors.OpError, ValueError) as e:
    # TensorFlow wraps the reason in graph-node noise: "{{function_node ...}}
    # reason [Op:Name]".
    reason = re.sub(r"\{\{[^}]*\}\}|\[Op:.*", "", getattr(e, "message", None) or str(e))
    return " ".join(reason.split())[:200]
  return None


class _Thumbnails:
  """Makes each shown image's thumbnail once and records unreadable images."""

  def __init__(self, folder, paths):
    self.folder, self.paths = folder, paths
    self.made, self.unreadable = {}, {}  # key -> relative path / (path, reason)
    os.makedirs(os.path.join(folder, "thumbs"))

  def item(self, key, caption):
    if self.paths is None:
      return _Item(key, caption)
    if key not in self.made and key not in self.unreadable:
      path = self.paths.get(key)
      name = f"thumbs/{hashlib.sha1(key.encode('utf-8')).hexdigest()[:20]}.jpg"
      problem = ("not in the manifest" if path is None
                 else _write_thumbnail(path, os.path.join(self.folder, name)))
      if problem is None:
        self.made[key] = name
      else:
        self.unreadable[key] = (path or "", problem)
    if key in self.made:
      return _Item(key, caption, thumbnail=self.made[key])
    return _Item(key, caption, problem=self.unreadable[key][1])


def _bin_colour(low, high, delta):
  if high <= delta:
    return "#d9534f"
  return "#5cb85c" if low >= delta else "#f0ad4e"


def _svg_histogram(counts, delta, width, height, axis=True):
  """Inline SVG bars of a HISTOGRAM_BINS histogram over [-1, 1], delta marked.

  Bars below delta are red (flagged as noise), above it green, and the bin
  holding delta amber; a dashed line of class "delta" marks the threshold.
  """
  pad = 14 if axis else 1
  plot_height = height - pad - 1
  bar = (width - 2) / HISTOGRAM_BINS
  edges = np.linspace(-1, 1, HISTOGRAM_BINS + 1)
  heights = counts / max(int(counts.max()), 1) * plot_height

  def x(score):
    return 1 + (score + 1) / 2 * (width - 2)

  parts = [f'<svg width="{width}" height="{height}" '
           f'role="img" aria-label="score histogram, delta {delta:.3f}">']
  parts += [f'<rect x="{1 + i * bar:.1f}" y="{1 + plot_height - h:.1f}" width="{bar - 0.5:.1f}" '
            f'height="{h:.1f}" fill="{_bin_colour(edges[i], edges[i + 1], delta)}">'
            f'<title>[{edges[i]:.2f}, {edges[i + 1]:.2f}): {n}</title></rect>'
            for i, (n, h) in enumerate(zip(counts.tolist(), heights)) if n]
  parts.append(f'<line class="delta" x1="{x(delta):.1f}" x2="{x(delta):.1f}" y1="0" '
               f'y2="{plot_height + 1:.1f}" stroke="#333" stroke-dasharray="3,2"/>')
  if axis:
    parts.append(f'<line x1="1" x2="{width - 1}" y1="{plot_height + 1:.1f}" '
                 f'y2="{plot_height + 1:.1f}" stroke="#999"/>')
    parts += [f'<text x="{x(v):.1f}" y="{height - 2}" text-anchor="{anchor}">{v:g}</text>'
              for v, anchor in ((-1, "start"), (0, "middle"), (1, "end"))]
    parts.append(f'<text x="{x(delta) + 3:.1f}" y="10">delta = {delta:.3f}</text>')
  parts.append("</svg>")
  return "".join(parts)


def _figure(item):
  if item.thumbnail:
    image = f'<img src="{html.escape(item.thumbnail)}" alt="{html.escape(item.key)}">'
  else:
    image = (f'<div class="placeholder" title="{html.escape(item.problem or "no manifest")}">'
             f'{"unreadable" if item.problem else "no image"}</div>')
  return (f"<figure>{image}<figcaption>{item.caption}<br>"
          f'<span class="key">{html.escape(item.key)}</span></figcaption></figure>')


def _grid(items):
  if not items:
    return '<p class="muted">none</p>'
  return '<div class="grid">' + "".join(map(_figure, items)) + "</div>"


def _score_caption(score, delta):
  return f'<span class="{"low" if score < delta else "high"}">{score:.3f}</span>'


def _page(title, body):
  return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
          f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
          f"<body>{body}</body></html>\n")


def _rate(numerator, denominator):
  return numerator / denominator if denominator else float("nan")


def _percent(value):
  return "&ndash;" if np.isnan(value) else f"{100 * value:.1f}%"


def _class_file(class_id):
  return f"class-{class_id:05d}.html"


def _verify_order(rows, class_verified, thresholds):
  """Indices of candidate rows in "verify next" order (module docstring)."""
  distance = np.abs(rows.score - thresholds[rows.class_id])
  rank = _rank_within_group(rows.class_id, distance)
  return np.lexsort((distance, rank, class_verified[rows.class_id]))


@dataclasses.dataclass
class _Report:
  """Everything the pages are rendered from."""
  class_names: Sequence[str]
  delta: float
  thresholds: np.ndarray  # [L], each class's (``scoring.class_thresholds``)
  stats: _ScoreStats
  class_verified: np.ndarray  # bool [L], the class has verification labels
  attention: np.ndarray  # [L, K]
  counts: np.ndarray  # [L], real references
  member_keys: np.ndarray  # [L, K]
  verify: _Rows
  has_truth: bool
  references_shown: int


def _class_page(report, class_id, thumbnails):
  stats, delta = report.stats, float(report.thresholds[class_id])
  name = report.class_names[class_id]
  rows = int(stats.rows[class_id])
  sections = [f'<p><a href="index.html">&larr; all classes</a></p><h1>{html.escape(name)}</h1>',
              f'<p class="lead">class {class_id} &middot; {rows} rows &middot; '
              f"{int(stats.below_delta[class_id])} below delta "
              f"({_percent(_rate(stats.below_delta[class_id], rows))} estimated noise)"
              + (f" &middot; {int(stats.verified[class_id])} verified rows" if
                 report.class_verified[class_id] else
                 f" &middot; no verification labels (delta {report.delta:.3f} moved to "
                 f"{delta:.3f} by its score quartiles)")
              + "</p>",
              _svg_histogram(stats.histogram[class_id], delta, 520, 160)]
  for title, candidates in (("Suspects: lowest scores", stats.lowest),
                            ("Highest scores", stats.highest)):
    picked = candidates.of_class(class_id)
    items = [thumbnails.item(key, _score_caption(score, delta))
             for key, score in zip(picked.key.tolist(), picked.score.tolist())]
    sections.append(f"<h2>{title}</h2>{_grid(items)}")
  count = int(report.counts[class_id])
  by_attention = np.argsort(-report.attention[class_id, :count], kind="stable")
  # A small set is split in halves, so no reference is both most and least.
  most = by_attention[:min(report.references_shown, (count + 1) // 2)]
  least = by_attention[::-1][:min(report.references_shown, count // 2)]
  sections.append('<p class="muted">References (paper Fig. 3): each is a K-means centroid of '
                  "the class's features, shown as the class member nearest to it, with its "
                  "attention weight &alpha;.</p>")
  for title, references in (("most", most), ("least", least)):
    items = [thumbnails.item(str(report.member_keys[class_id, r]),
                             f"ref {r} &middot; &alpha; = {report.attention[class_id, r]:.3f}")
             for r in references if report.member_keys[class_id, r]]
    sections.append(f"<h2>References with the {title} attention</h2>{_grid(items)}")
  return _page(f"{name}: CleanNet review", "".join(sections))


def _index_page(report, thumbnails, verify_items):
  stats, delta, names = report.stats, report.delta, report.class_names
  thresholds = report.thresholds
  noise = stats.below_delta / np.maximum(stats.rows, 1)
  order = np.lexsort((np.arange(len(names)), -noise))
  total = int(stats.rows.sum())
  header = ("<tr><th>class</th><th>rows</th><th>verified</th><th>estimated noise</th>"
            "<th>measured (verified rows)</th>"
            + ("<th>measured (clean labels)</th>" if report.has_truth else "")
            + "<th>scores</th></tr>")
  body = []
  for c in order.tolist():
    verified = (f'<span class="tag">{int(stats.verified[c])} verified</span>'
                if report.class_verified[c] else "")
    body.append(
        f'<tr id="class-{c}"><td><a href="{_class_file(c)}">{html.escape(names[c])}</a></td>'
        f'<td class="num">{int(stats.rows[c])}</td><td>{verified}</td>'
        f'<td class="num">{_percent(_rate(stats.below_delta[c], stats.rows[c]))} '
        f'<span class="bar" style="width:{100 * noise[c]:.0f}px"></span></td>'
        f'<td class="num">{_percent(_rate(stats.verified_noisy[c], stats.verified[c]))}</td>'
        + (f'<td class="num">{_percent(_rate(stats.truth_noisy[c], stats.truth_known[c]))}</td>'
           if report.has_truth else "")
        + f"<td>{_svg_histogram(stats.histogram[c], thresholds[c], 160, 28, axis=False)}"
        "</td></tr>")
  unreadable = "".join(
      f"<tr><td>{html.escape(key)}</td><td>{html.escape(path)}</td><td>{html.escape(why)}</td></tr>"
      for key, (path, why) in thumbnails.unreadable.items())
  sections = [
      "<h1>CleanNet review</h1>",
      f'<p class="lead">{total} rows &middot; {len(names)} classes &middot; delta = {delta:.3f}'
      f" &middot; {int(stats.below_delta.sum())} rows scored below their class's delta "
      f"({_percent(_rate(stats.below_delta.sum(), total))} estimated noise)</p>",
      "<h2>Classes by estimated noise</h2>",
      '<p class="muted">estimated noise: share of rows scored below delta (red bars in the '
      "histograms; a class without verification labels has delta moved by its score "
      "quartiles); measured: share of verified rows labelled 0"
      + (", and of rows whose clean label differs" if report.has_truth else "")
      + ".</p>",
      f"<table>{header}{''.join(body)}</table>",
      f"<h2>Verify next ({len(verify_items)} rows, <a href=\"verify_next.csv\">"
      "verify_next.csv</a>)</h2>",
      '<p class="muted">unverified rows with scores nearest their class\'s delta, round-robin over classes, '
      "classes without verification labels first. Fill in the verification column (1 = label "
      "correct, 0 = mislabeled) and feed the file back as verification labels.</p>",
      _grid(verify_items)]
  if thumbnails.unreadable:
    sections.append(f"<h2>Unreadable images ({len(thumbnails.unreadable)}, "
                    '<a href="unreadable.csv">unreadable.csv</a>)</h2>'
                    f"<table><tr><th>key</th><th>path</th><th>reason</th></tr>{unreadable}</table>")
  return _page("CleanNet review", "".join(sections))


def _write_csv(path, header, rows):
  with open(path, "w", encoding="utf-8", newline="") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)


def _render(report, folder, paths):
  """Writes the whole report into `folder` (a new, empty folder)."""
  thumbnails = _Thumbnails(folder, paths)
  for class_id in range(len(report.class_names)):
    with open(os.path.join(folder, _class_file(class_id)), "w", encoding="utf-8") as f:
      f.write(_class_page(report, class_id, thumbnails))
  verify, names = report.verify, report.class_names
  verify_items = [
      thumbnails.item(key, f"{html.escape(names[c])} &middot; {_score_caption(s, report.thresholds[c])}")
      for key, c, s in zip(verify.key.tolist(), verify.class_id.tolist(), verify.score.tolist())]
  _write_csv(os.path.join(folder, "verify_next.csv"), VERIFY_COLUMNS,
             [(key, (paths or {}).get(key, ""), names[c], "")
              for key, c in zip(verify.key.tolist(), verify.class_id.tolist())])
  with open(os.path.join(folder, "index.html"), "w", encoding="utf-8") as f:
    f.write(_index_page(report, thumbnails, verify_items))
  _write_csv(os.path.join(folder, "unreadable.csv"), UNREADABLE_COLUMNS,
             [(key, path, why) for key, (path, why) in thumbnails.unreadable.items()])
  return thumbnails


def _replace_folder(new, target):
  """Moves `new` to `target`, replacing an existing `target` (renames only)."""
  old = None
  if os.path.exists(target):
    old = tempfile.mkdtemp(dir=os.path.dirname(target),
                           prefix=f".{os.path.basename(target)}.old-")
    os.rename(target, os.path.join(old, "report"))
  os.rename(new, target)
  if old is not None:
    shutil.rmtree(old)


def write_report(model, feature_info, score_paths, out_dir, manifest=None, truth=None,
                 per_class=12, verify_budget=200, references_shown=3):
  """Writes the review report folder (see the module docstring).

  Args:
    model: the CleanNet that scored the rows (its delta, references and
      attention are shown).
    feature_info: the scored feature set (``data.read_info``).
    score_paths: the score TSVs of ``scoring.score_feature_set``.
    out_dir: the report folder; written aside and renamed into place, so it
      holds the old report or the new one, never half of one.
    manifest: optional CSV with columns ``key`` and ``path`` (relative to the
      manifest's folder) locating the images, and optionally ``clean_label``;
      without it the pages show keys and scores only.
    truth: optional CSV ``key,clean_label`` (class name or id); overrides the
      manifest's ``clean_label`` column.
    per_class: lowest and highest scored rows shown per class.
    verify_budget: rows listed in ``verify_next.csv``.
    references_shown: references with the most (and the least) attention shown
      per class.

  Returns:
    A summary dict: output_dir, rows, classes, delta, below_delta,
    verify_next, thumbnails, unreadable.

  Raises:
    InputError: a score TSV, manifest or truth file is malformed (naming the
      file and line), or the model does not fit the feature set.
  """
  if per_class < 1 or verify_budget < 0 or references_shown < 0:
    raise InputError(f"per_class ({per_class}) must be >= 1, verify_budget ({verify_budget}) "
                     f"and references_shown ({references_shown}) >= 0")
  if (feature_info.num_classes, feature_info.dim) != (model.num_classes, model.feature_dim):
    raise InputError(f"{feature_info.directory}: {feature_info.num_classes} classes of "
                     f"{feature_info.dim}-d features, but the model expects "
                     f"{model.num_classes} of {model.feature_dim}")
  if not score_paths:
    raise InputError("no score files given")
  names = feature_info.class_names
  delta = float(model.delta.numpy())
  thresholds = scoring.class_thresholds(model)
  clean = None
  if truth is not None:
    clean = _Truth.read(truth, names, "clean_label")
  elif manifest is not None:
    with _open(manifest, "the manifest") as f:
      has_column = "clean_label" in next(csv.reader(f), [])
    clean = _Truth.read(manifest, names, "clean_label") if has_column else None
  stats = _read_scores(score_paths, len(names), thresholds, per_class, verify_budget, clean)
  class_verified = feature_info.class_counts[:, 1:].sum(axis=1) > 0
  candidates = stats.near_delta.rows
  verify = candidates.take(_verify_order(candidates, class_verified,
                                         thresholds)[:verify_budget])
  _, attention = model.class_embeddings()
  member_keys, _ = nearest_members(model, feature_info)
  report = _Report(names, delta, thresholds, stats, class_verified, np.asarray(attention),
                   model.reference_counts.numpy(), member_keys, verify, clean is not None,
                   references_shown)
  paths = None
  if manifest is not None:
    shown = {*stats.lowest.rows.key.tolist(), *stats.highest.rows.key.tolist(),
             *verify.key.tolist(), *member_keys[member_keys != ""].tolist()}
    paths = _read_paths(manifest, shown)

  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  folder = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out_dir)}.", suffix=".tmp")
  try:
    thumbnails = _render(report, folder, paths)
    _replace_folder(folder, out_dir)
  except BaseException:
    shutil.rmtree(folder, ignore_errors=True)
    raise
  return {"output_dir": out_dir, "rows": int(stats.rows.sum()), "classes": len(names),
          "delta": delta, "below_delta": int(stats.below_delta.sum()),
          "verify_next": len(verify), "thumbnails": len(thumbnails.made),
          "unreadable": len(thumbnails.unreadable)}
