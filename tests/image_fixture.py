"""Tiny labelled images written by tests: 3 classes told apart by brightness."""

import os

import numpy as np
import tensorflow as tf

CLASSES = ("dark", "mid", "light")


def write_images(folder, n=30, size=16, seed=0):
  """Writes n JPEG/PNG images and a CSV manifest; returns the manifest path.

  Row i has class i % 3; the first half of the rows are verified (1 where the
  label is right; every 5th label is wrong), the rest have verification -1.
  """
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(folder, "img"), exist_ok=True)
  lines = ["path,label,verification"]
  for i in range(n):
    true = i % 3
    pixels = np.clip(rng.normal(40 + 85 * true, 15, (size, size, 3)), 0, 255)
    pixels = pixels.astype(np.uint8)
    encode = tf.io.encode_png if i % 2 else tf.io.encode_jpeg
    name = f"img/{i:03d}.{'png' if i % 2 else 'jpg'}"
    with open(os.path.join(folder, name), "wb") as f:
      f.write(encode(pixels).numpy())
    noisy = (true + 1) % 3 if i % 5 == 4 else true
    verification = int(noisy == true) if i < n // 2 else -1
    lines.append(f"{name},{CLASSES[noisy]},{verification}")
  path = os.path.join(folder, "manifest.csv")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return path
