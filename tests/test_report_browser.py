"""End to end: the review report renders in headless Chromium without errors.

Needs Debian's ``chromium`` at /usr/bin/chromium. When it is missing and the
test runs as root, the set-up installs it (``apt-get update`` and
``apt-get install -y chromium``: about 30 s on a warm mirror, once per
machine); otherwise, or if the install fails, the test is skipped with the
reason. Once Chromium is there the test takes a few seconds.
"""

import os
import shutil
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from cleannet_tf import report
from test_report import build_scored_set

CHROMIUM = "/usr/bin/chromium"
# The report has no scripts, so any console message at all is a fault;
# Chromium logs them as "...:INFO:CONSOLE:<line>] "message", source: ...".
CONSOLE_MARKERS = (":CONSOLE", "Uncaught")


def _install_chromium():
  """Returns None once Chromium is there, else why it cannot be."""
  if os.path.exists(CHROMIUM):
    return None
  if os.geteuid() != 0 or not shutil.which("apt-get"):
    return f"{CHROMIUM} missing and cannot apt-get install chromium (not root on Debian)"
  environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
  for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
    try:
      result = subprocess.run(command, capture_output=True, text=True, timeout=900,
                              env=environment)
    except subprocess.TimeoutExpired:
      return f"{' '.join(command)} timed out"
    if result.returncode:
      return f"{' '.join(command)} failed: {result.stderr.strip()[-300:]}"
  return None if os.path.exists(CHROMIUM) else f"chromium installed but {CHROMIUM} is missing"


@pytest.fixture(name="chromium", scope="module")
def fixture_chromium():
  reason = _install_chromium()
  if reason:
    pytest.skip(reason)
  return CHROMIUM


def _run_chromium(chromium, profile, *arguments):
  command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
             "--enable-logging=stderr", "--v=0", "--window-size=1280,2000", *arguments]
  result = subprocess.run(command, capture_output=True, text=True, timeout=60)
  console = [line for line in result.stderr.splitlines()
             if any(marker in line for marker in CONSOLE_MARKERS)]
  assert result.returncode == 0, result.stderr[-2000:]
  assert not console, console
  return result.stdout


def test_index_renders_with_thumbnails_and_no_console_errors(chromium, tmp_path):
  scored = build_scored_set(tmp_path)
  summary = report.write_report(scored["model"], scored["info"], scored["score_paths"],
                                str(tmp_path / "review"), manifest=scored["manifest"],
                                per_class=6, verify_budget=12)
  index = (tmp_path / "review" / "index.html").as_uri()
  screenshot = tmp_path / "index.png"
  _run_chromium(chromium, tmp_path / "profile", f"--screenshot={screenshot}", index)
  assert screenshot.stat().st_size > 5000
  pixels = tf.io.decode_png(tf.io.read_file(str(screenshot)), channels=3).numpy()
  assert pixels.shape == (2000, 1280, 3) and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50

  dom = _run_chromium(chromium, tmp_path / "profile", "--dump-dom", index)
  assert "CleanNet review" in dom and dom.count("<tr id=\"class-") == 3
  written = (tmp_path / "review" / "index.html").read_text(encoding="utf-8")
  assert summary["verify_next"] == 12
  assert 0 < dom.count('<img src="thumbs/') == written.count('<img src="thumbs/')
  assert "Unreadable images (2" in dom
