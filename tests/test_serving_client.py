"""The serving client over gRPC and REST against test-only servers on loopback."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from cleannet_tf import data, export, serving_client
from cleannet_tf.errors import InputError
import serving_fixture
from test_export import CLASSES, IMAGE_SIZE, image_features, tiny_backbone
from test_scoring import DIM, feature_set, small_model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """(model base path, Keras model, backbone) with two versions; 2 is the real one."""
  root = tmp_path_factory.mktemp("serving")
  model, backbone = small_model(), tiny_backbone()
  export.export_savedmodel(small_model(delta=0.9), CLASSES, str(root), version=1)
  export.export_savedmodel(model, CLASSES, str(root), backbone=backbone)
  return str(root / "cleannet"), model, backbone


def read_scores(path):
  with open(path, encoding="utf-8") as f:
    header, *lines = f.read().splitlines()
  assert header.split("\t") == list(serving_client.OUTPUT_COLUMNS)
  rows = [line.split("\t") for line in lines]
  return {name: [row[i] for row in rows] for i, name in enumerate(serving_client.OUTPUT_COLUMNS)}


def assert_scores_match(table, model, features, class_id, keys):
  expected = model({"features": features, "class_id": class_id})["score"].numpy()
  assert table["key"] == keys
  assert table["class_id"] == [str(c) for c in class_id]
  np.testing.assert_allclose(np.array(table["score"], float), expected, atol=1e-5)
  assert table["is_clean"] == [str(int(s >= 0.2)) for s in expected]
  np.testing.assert_allclose(np.array(table["weight_soft"], float), np.maximum(expected, 0),
                             atol=1e-5)


@pytest.fixture(params=["grpc", "rest"])
def client(request, served):
  server = {"grpc": serving_fixture.grpc_server,
            "rest": serving_fixture.rest_server}[request.param]
  with server(served[0]) as address:
    client = serving_client.make_client(request.param, address, "cleannet", timeout=10)
    yield client
    client.close()


def test_feature_set_scores_like_keras(client, served, tmp_path):
  info = feature_set(tmp_path / "features")
  output = tmp_path / "out" / "scores.tsv"
  assert serving_client.score_feature_set(client, info, output, batch_size=4) == info.num_rows
  rows = data.load_arrays(info, verification="all")
  assert_scores_match(read_scores(output), served[1], rows["features"], rows["class_id"],
                      [key.decode() for key in rows["key"]])
  assert os.listdir(output.parent) == ["scores.tsv"]


def test_image_manifest_scores_like_keras(client, served, tmp_path):
  rng = np.random.default_rng(4)
  pixels = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            for size in (IMAGE_SIZE, IMAGE_SIZE, 20)]
  names = [f"img{i}.png" for i in range(len(pixels))]
  for name, image in zip(names, pixels):
    tf.io.write_file(str(tmp_path / name), tf.io.encode_png(image))
  class_id = np.array([0, 2, 1])
  (tmp_path / "manifest.tsv").write_text(
      "".join(f"{name}\t{c}\n" for name, c in zip(names, class_id)), encoding="utf-8")
  output = tmp_path / "scores.tsv"
  assert serving_client.score_images(client, tmp_path / "manifest.tsv", output, 2) == 3
  assert_scores_match(read_scores(output), served[1], image_features(served[2], pixels),
                      class_id, names)


def test_rejected_request_fails_at_once_with_the_server_message(client):
  with pytest.raises(InputError, match=r"rejected the request.*class_id must be < 3"):
    client.predict("serving_default", {"features": np.ones((2, DIM), np.float32),
                                       "class_id": np.array([0, 3])})


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_unreachable_server_is_one_error_after_bounded_retries(protocol):
  address = f"127.0.0.1:{free_port()}"
  client = serving_client.make_client(protocol, address, "cleannet", timeout=0.5, tries=3,
                                      backoff=0.01)
  with pytest.raises(InputError) as error:
    client.predict("serving_default", {"features": np.ones((1, DIM), np.float32),
                                       "class_id": np.array([0])})
  client.close()
  message = str(error.value)
  assert message.startswith(f"cannot reach TF Serving at {address} after 3 tries: ")
  assert "\n" not in message


def test_client_tool_over_grpc(served, tmp_path):
  info = feature_set(tmp_path / "features")
  output = tmp_path / "scores.tsv"
  with serving_fixture.grpc_server(served[0]) as address:
    result = subprocess.run(
        [sys.executable, "-m", "tools.serving_client", f"--server={address}",
         f"--features={info.directory}", f"--output={output}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
  assert '"rows": 23' in result.stdout
  rows = data.load_arrays(info, verification="all")
  assert_scores_match(read_scores(output), served[1], rows["features"], rows["class_id"],
                      [key.decode() for key in rows["key"]])


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_stalled_server_times_out_each_try(protocol):
  """A server that accepts but never answers costs `tries` timeouts, then the error."""
  with socket.socket() as listener:
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    client = serving_client.make_client(protocol, address, "cleannet", timeout=0.2, tries=3,
                                        backoff=0.01)
    with pytest.raises(InputError, match=f"cannot reach TF Serving at {address} after 3 tries"):
      client.predict("serving_default", {"features": np.ones((1, DIM), np.float32),
                                         "class_id": np.array([0])})
    client.close()
    if protocol == "rest":
      # Each try opened its own connection: exactly three, no more.
      listener.setblocking(False)
      accepted = []
      with pytest.raises(BlockingIOError):
        while True:
          accepted.append(listener.accept()[0])
      for connection in accepted:
        connection.close()
      assert len(accepted) == 3
