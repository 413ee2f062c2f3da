"""Build (and optionally send) a TF Serving predict request for image files.

Usage:
    python tools/predict_request.py cat.jpg dog.png > body.json      # REST body, serve_bytes
    curl -d @body.json http://localhost:8501/v1/models/tl_keras:predict
    python tools/predict_request.py cat.jpg --server=localhost:8501  # send it, print the answer
    python tools/predict_request.py cat.jpg --format=grpc --server=localhost:8500
    python tools/predict_request.py cat.jpg --signature=serving_default --image_size=96

`serve_bytes` (default) sends the files as they are, base64 in JSON
(`{"b64": ...}`) or a string tensor in gRPC; the server decodes and resizes.
`serving_default` decodes and resizes here, the way the exported graph does,
and sends float32 pixels [N, image_size, image_size, 3].

A REST `serve_bytes` request needs nothing beyond Python. `serving_default`
needs TensorFlow and tl_keras (it decodes with the exported graph's own
function); gRPC needs TensorFlow and `tensorflow-serving-api` (`pip install
--no-deps tensorflow-serving-api` beside tensorflow-cpu). Errors: one line, exit 2.
"""

import base64
import json
import re
import sys
import urllib.error
import urllib.request

from absl import app, flags

from _common import fail, first_line

FLAGS = flags.FLAGS
MAX_IMAGE_SIZE = 2048  # tl_keras.plan.MAX_IMAGE_SIZE (not imported: REST needs no Keras)


def define_flags():
    """The command line's flags; defined only when run as a program, so that the
    request builders below import without them (tests, other tools)."""
    flags.DEFINE_enum("format", "rest", ["rest", "grpc"], "Request format.")
    flags.DEFINE_enum("signature", "serve_bytes", ["serve_bytes", "serving_default"],
                      "The exported signature to call.")
    flags.DEFINE_integer("image_size", None, "The model's input size (serving_default only).")
    flags.DEFINE_string("model_name", "tl_keras", "The model name TF Serving serves it under.")
    flags.DEFINE_string("server", None, "HOST:PORT to send the request to (REST 8501, gRPC "
                        "8500); without it the request is printed.")
    flags.DEFINE_float("timeout", 30.0, "Seconds to wait for the server.")


def read_images(paths):
    """The files' bytes, in order; a missing or empty file raises ValueError naming it."""
    images = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ValueError(f"cannot read image {path!r}: {e.strerror}") from None
        if not data:
            raise ValueError(f"image {path!r} is empty")
        images.append(data)
    return images


def pixels(images, image_size):
    """float32 [N, image_size, image_size, 3] as the exported `serve_bytes` graph makes them."""
    import tensorflow as tf

    from tl_keras.export import decode_image

    decoded = []
    for i, data in enumerate(images):
        try:
            decoded.append(decode_image(data, image_size, image_size))
        except tf.errors.InvalidArgumentError as e:  # TensorFlow's reason, without its op names
            reason = re.sub(r"\{\{.*?\}\}|\[Op:\w+\]", "", e.message).strip()
            raise ValueError(f"image {i + 1} cannot be decoded: {reason}") from None
    return tf.stack(decoded).numpy()


def rest_body(images, signature="serve_bytes", image_size=None):
    """The JSON body of a TF Serving REST predict request (row format)."""
    if signature == "serve_bytes":
        instances = [{"b64": base64.b64encode(d).decode("ascii")} for d in images]
    else:
        instances = pixels(images, image_size).tolist()
    return {"signature_name": signature, "instances": instances}


def grpc_request(images, signature="serve_bytes", image_size=None, model_name="tl_keras"):
    """A `tensorflow_serving.apis.predict_pb2.PredictRequest`."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    if signature == "serve_bytes":
        request.inputs["image_bytes"].CopyFrom(
            tf.make_tensor_proto(images, dtype=tf.string, shape=[len(images)]))
    else:
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(pixels(images, image_size)))
    return request


def send_rest(body, server, model_name, timeout):
    request = urllib.request.Request(
        f"http://{server}/v1/models/{model_name}:predict",
        data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def send_grpc(request, server, timeout):
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(server) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(request, timeout=timeout)
    return {k: tf.make_ndarray(v).tolist() for k, v in response.outputs.items()}


def check_server(server):
    """Raises `ValueError` unless `server` is HOST:PORT with a port number."""
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--server must be HOST:PORT with a port number, got {server!r}")


def main(argv):
    paths = argv[1:]
    if not paths:
        fail("give one or more image files")
    if FLAGS.server:
        try:
            check_server(FLAGS.server)
        except ValueError as e:
            fail(first_line(e))
    if FLAGS.signature == "serving_default" and not FLAGS.image_size:
        fail("--signature=serving_default needs --image_size (the model's input size)")
    if FLAGS.image_size is not None and not 1 <= FLAGS.image_size <= MAX_IMAGE_SIZE:
        fail(f"--image_size must be 1 to {MAX_IMAGE_SIZE} (a model tl_keras builds takes "
             f"at most that), got {FLAGS.image_size}")
    try:
        images = read_images(paths)
        if FLAGS.format == "rest":
            body = rest_body(images, FLAGS.signature, FLAGS.image_size)
            if not FLAGS.server:
                json.dump(body, sys.stdout)
                print()
                return
            answer = send_rest(body, FLAGS.server, FLAGS.model_name, FLAGS.timeout)
        else:
            try:
                request = grpc_request(images, FLAGS.signature, FLAGS.image_size,
                                       FLAGS.model_name)
            except ImportError as e:
                fail(f"--format=grpc needs {e.name}: pip install --no-deps tensorflow-serving-api")
            if not FLAGS.server:
                print(request)
                return
            answer = send_grpc(request, FLAGS.server, FLAGS.timeout)
    except ValueError as e:
        fail(first_line(e))
    except urllib.error.HTTPError as e:  # the server answered with an error, e.g. a bad image
        fail(f"server answered {e.code}: {first_line(e.read().decode(errors='replace'))}")
    except OSError as e:  # URLError, connection refused, timeouts
        fail(f"no answer from {FLAGS.server}: {getattr(e, 'reason', None) or e}")
    except Exception as e:  # grpc.RpcError: unavailable, deadline, the model's InvalidArgument
        if hasattr(e, "code") and hasattr(e, "details"):
            fail(f"gRPC {e.code().name} from {FLAGS.server}: {first_line(e.details() or '')}")
        raise
    print(json.dumps(answer))


if __name__ == "__main__":
    define_flags()
    app.run(main)
