"""Scoring against a running TF Serving over gRPC or REST (see cleannet_tf.export).

Two clients with one method, ``predict(signature, inputs) -> outputs`` (dicts
of numpy arrays): ``GrpcClient`` sends ``PredictRequest``s through
``tensorflow-serving-api``; ``RestClient`` posts the columnar JSON format to
``/v1/models/<name>:predict``. Both use a timeout per request and retry a
request a bounded number of times, with exponential backoff, while the server
is unreachable, unavailable or too slow; then they raise a one-line
InputError. A request the server rejects (e.g. a class id outside [0, L))
fails at once.

``score_feature_set`` and ``score_images`` send batches of a feature set or of
an image manifest and write ``key \\t class_id \\t score \\t is_clean \\t
weight_soft`` rows to a TSV that appears atomically.
"""

import base64
import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_service_pb2_grpc

from cleannet_tf import data
from cleannet_tf.errors import InputError
from cleannet_tf.export import IMAGES_SIGNATURE, SCORE_SIGNATURE

OUTPUT_COLUMNS = ("key", "class_id", "score", "is_clean", "weight_soft")
_RETRIED_GRPC_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# 503 is what TF Serving answers while the model is still loading.
_RETRIED_HTTP_CODES = (502, 503, 504)


class _Retry(Exception):
  """A failure worth another try: the server was unreachable or too slow."""


class _Client:
  """Timeouts and bounded retries shared by the gRPC and REST clients."""

  def __init__(self, where, model_name, timeout=30.0, tries=3, backoff=0.5):
    """Sets the retry policy.

    Args:
      where: host:port (or URL) named in error messages.
      model_name: the name the server serves the model under.
      timeout: seconds per request.
      tries: attempts per request, >= 1.
      backoff: seconds before the second try, doubled before each later one.
    """
    if tries < 1:
      raise InputError(f"--tries={tries}: must be >= 1")
    self.where = where
    self.model_name = model_name
    self.timeout = timeout
    self.tries = tries
    self.backoff = backoff

  def predict(self, signature, inputs):
    """Runs `signature` on `inputs` ({name: array [N, ...]}) -> {name: array}."""
    for attempt in range(self.tries):
      if attempt:
        time.sleep(self.backoff * 2 ** (attempt - 1))
      try:
        return self._predict_once(signature, inputs)
      except _Retry as error:
        last = error
    raise InputError(f"cannot reach TF Serving at {self.where} after {self.tries} tries: "
                     f"{last}")

  def _predict_once(self, signature, inputs):
    raise NotImplementedError

  def _rejected(self, detail):
    return InputError(f"TF Serving at {self.where} rejected the request for model "
                      f"{self.model_name!r}: {' '.join(str(detail).split())}")


class GrpcClient(_Client):
  """PredictionService over gRPC (TF Serving's port 8500)."""

  def __init__(self, target, model_name, **kwargs):
    super().__init__(target, model_name, **kwargs)
    # A batch of 4096 x 2048 features is 32 MiB, beyond gRPC's 4 MiB default.
    self._channel = grpc.insecure_channel(target, options=[
        ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
    self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

  def close(self):
    self._channel.close()

  def _predict_once(self, signature, inputs):
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(
        name=self.model_name, signature_name=signature))
    for name, value in inputs.items():
      request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    try:
      response = self._stub.Predict(request, timeout=self.timeout)
    except grpc.RpcError as error:
      detail = f"{error.code().name}: {error.details()}"
      if error.code() in _RETRIED_GRPC_CODES:
        raise _Retry(detail) from None
      raise self._rejected(detail) from None
    return {name: tf.make_ndarray(tensor) for name, tensor in response.outputs.items()}


class RestClient(_Client):
  """The REST predict API (TF Serving's port 8501), columnar JSON."""

  def __init__(self, host_port, model_name, **kwargs):
    super().__init__(host_port, model_name, **kwargs)
    self.url = f"http://{host_port}/v1/models/{model_name}:predict"

  def close(self):
    pass

  def _predict_once(self, signature, inputs):
    body = json.dumps({"signature_name": signature,
                       "inputs": {name: _to_json(value) for name, value in inputs.items()}})
    request = urllib.request.Request(self.url, data=body.encode("utf-8"), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
      with urllib.request.urlopen(request, timeout=self.timeout) as response:
        outputs = json.load(response)["outputs"]
    except urllib.error.HTTPError as error:
      detail = f"HTTP {error.code}: {error.read().decode('utf-8', 'replace')}"
      if error.code in _RETRIED_HTTP_CODES:
        raise _Retry(detail) from None
      raise self._rejected(detail) from None
    except (urllib.error.URLError, http.client.HTTPException, socket.timeout,
            ConnectionError) as error:
      raise _Retry(getattr(error, "reason", error)) from None
    # A signature with one output answers with that output itself.
    if not isinstance(outputs, dict):
      return {"outputs": np.asarray(outputs)}
    return {name: np.asarray(value) for name, value in outputs.items()}


def _to_json(value):
  """An input array as JSON: binary strings go as {"b64": ...} (REST API rule)."""
  value = np.asarray(value)
  if value.dtype.kind in "SO":
    return [{"b64": base64.b64encode(item).decode("ascii")} for item in value.tolist()]
  return value.tolist()


def make_client(protocol, server, model_name, **kwargs):
  """A GrpcClient ("grpc") or RestClient ("rest") for host:port `server`."""
  clients = {"grpc": GrpcClient, "rest": RestClient}
  if protocol not in clients:
    raise InputError(f"--protocol={protocol}: expected one of {', '.join(clients)}")
  return clients[protocol](server, model_name, **kwargs)


def _format_rows(keys, class_id, outputs):
  """TSV lines for one batch: key, class_id, score, is_clean, weight_soft."""
  columns = zip(keys, class_id.tolist(),
                np.char.mod("%.6f", np.asarray(outputs["score"], np.float64)),
                np.asarray(outputs["is_clean"]).astype(np.int64).tolist(),
                np.char.mod("%.6f", np.asarray(outputs["weight_soft"], np.float64)))
  return "".join("\t".join(map(str, row)) + "\n" for row in columns)


def _write_scores(output_path, batches, client, signature):
  """Sends each (keys, inputs) batch and writes the score TSV atomically.

  Returns:
    The number of rows written.
  """
  output_path = os.fspath(output_path)
  directory = os.path.dirname(os.path.abspath(output_path))
  os.makedirs(directory, exist_ok=True)
  temporary = os.path.join(directory, f".{os.path.basename(output_path)}.tmp")
  rows = 0
  try:
    with open(temporary, "w", encoding="utf-8") as out:
      out.write("\t".join(OUTPUT_COLUMNS) + "\n")
      for keys, inputs in batches:
        out.write(_format_rows(keys, inputs["class_id"], client.predict(signature, inputs)))
        rows += len(keys)
    os.replace(temporary, output_path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)
  return rows


def score_feature_set(client, info, output_path, batch_size=1024):
  """Scores every row of a feature set (``data.read_info``) through `client`.

  Returns:
    The number of rows written to `output_path`.
  """

  def batches():
    for batch in data.feature_dataset(info).batch(batch_size).as_numpy_iterator():
      keys = [key.decode("utf-8") for key in batch["key"]]
      yield keys, {"features": batch["features"], "class_id": batch["class_id"]}

  return _write_scores(output_path, batches(), client, SCORE_SIGNATURE)


def read_manifest(path):
  """Reads an image manifest: ``image_path \\t class_id`` per line.

  Relative image paths are relative to the manifest's directory.

  Returns:
    (image paths [n] as written, the same resolved [n], class ids int64 [n]).

  Raises:
    InputError: naming ``path:line`` for a malformed line.
  """
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as error:
    raise InputError(f"{path}: cannot read the manifest ({error})") from None
  fields = [line.split("\t") for line in lines]
  bad = next((i for i, row in enumerate(fields)
              if len(row) != 2 or not row[0] or not row[1].strip().isdigit()), None)
  if bad is not None:
    raise InputError(f"{path}:{bad + 1}: expected 'image_path<TAB>class_id', got "
                     f"{lines[bad]!r}")
  if not fields:
    raise InputError(f"{path}: no images")
  base = os.path.dirname(os.path.abspath(path))
  names = [row[0] for row in fields]
  return (names, [os.path.join(base, name) for name in names],
          np.array([int(row[1]) for row in fields], np.int64))


def score_images(client, manifest_path, output_path, batch_size=64):
  """Scores the images of a manifest (see read_manifest) via ``score_images``.

  Rows are keyed by the image path as written in the manifest.

  Returns:
    The number of rows written to `output_path`.
  """
  names, paths, class_ids = read_manifest(manifest_path)

  def read(image_path):
    try:
      with open(image_path, "rb") as f:
        return f.read()
    except OSError as error:
      raise InputError(f"{image_path}: cannot read the image ({error.strerror})") from None

  def batches():
    for start in range(0, len(paths), batch_size):
      end = start + batch_size
      images = np.array([read(image_path) for image_path in paths[start:end]], dtype=object)
      yield names[start:end], {"images": images, "class_id": class_ids[start:end]}

  return _write_scores(output_path, batches(), client, IMAGES_SIGNATURE)
