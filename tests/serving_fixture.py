"""Test-only stand-ins for TF Serving: a gRPC PredictionService and a REST server.

Both load a model the way TF Serving does (the highest numeric version under
the base path) and run its signatures; neither imports cleannet_tf, so they
see only what the SavedModel holds. They serve on loopback from threads.
"""

import base64
from concurrent import futures
import contextlib
import http.server
import json
import os
import re
import threading

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc


def load_latest(base_path):
  """Loads ``base_path/<highest numeric version>``, as TF Serving picks it."""
  versions = [int(name) for name in os.listdir(base_path) if re.fullmatch(r"\d+", name)]
  return tf.saved_model.load(os.path.join(base_path, str(max(versions))))


def _run(loaded, signature, inputs):
  """{name: array} -> {name: array}; a missing signature is a KeyError."""
  function = loaded.signatures[signature or "serving_default"]
  return {name: value.numpy() for name, value in function(**{
      name: tf.constant(value, function.structured_input_signature[1][name].dtype)
      for name, value in inputs.items()}).items()}


class _PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):

  def __init__(self, model_name, loaded):
    self.model_name = model_name
    self.loaded = loaded

  def Predict(self, request, context):  # pylint: disable=invalid-name
    if request.model_spec.name != self.model_name:
      context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found: {request.model_spec.name}")
    inputs = {name: tf.make_ndarray(tensor) for name, tensor in request.inputs.items()}
    try:
      outputs = _run(self.loaded, request.model_spec.signature_name, inputs)
    except (tf.errors.InvalidArgumentError, KeyError, TypeError) as error:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    response = predict_pb2.PredictResponse()
    response.model_spec.CopyFrom(request.model_spec)
    for name, value in outputs.items():
      response.outputs[name].CopyFrom(tf.make_tensor_proto(value))
    return response


@contextlib.contextmanager
def grpc_server(base_path, model_name="cleannet"):
  """Serves the model over gRPC on a free loopback port; yields "host:port"."""
  server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
  prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
      _PredictionService(model_name, load_latest(base_path)), server)
  port = server.add_insecure_port("127.0.0.1:0")
  server.start()
  try:
    yield f"127.0.0.1:{port}"
  finally:
    server.stop(grace=None)


def _from_json(value):
  """Columnar JSON input -> array; {"b64": ...} items are binary strings."""
  if isinstance(value, list) and value and isinstance(value[0], dict):
    return np.array([base64.b64decode(item["b64"]) for item in value], dtype=object)
  return np.asarray(value)


@contextlib.contextmanager
def rest_server(base_path, model_name="cleannet"):
  """Serves ``POST /v1/models/<name>:predict`` on loopback; yields "host:port"."""
  loaded = load_latest(base_path)

  class Handler(http.server.BaseHTTPRequestHandler):

    def do_POST(self):  # pylint: disable=invalid-name
      if self.path != f"/v1/models/{model_name}:predict":
        return self._reply(404, {"error": f"Servable not found for path {self.path}"})
      body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
      try:
        outputs = _run(loaded, body.get("signature_name"),
                       {name: _from_json(value) for name, value in body["inputs"].items()})
      except (tf.errors.InvalidArgumentError, KeyError, TypeError) as error:
        return self._reply(400, {"error": str(error)})
      outputs = {name: value.tolist() for name, value in outputs.items()}
      # As TF Serving: a single output is returned bare, not in a dict.
      return self._reply(200, {"outputs": next(iter(outputs.values()))
                                          if len(outputs) == 1 else outputs})

    def _reply(self, status, payload):
      body = json.dumps(payload).encode("utf-8")
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"127.0.0.1:{server.server_address[1]}"
  finally:
    server.shutdown()
    server.server_close()
