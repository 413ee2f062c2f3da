"""finetune.py run as a user runs it, then its SavedModel for TF Serving: layout, signatures,
outputs, isolation, request helpers."""

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import predict_request  # tools/ is on pytest's pythonpath (setup.cfg)
from conftest import ROOT, TOOLS, TINY_BACKBONE, TINY_SIZE, tiny_config, tool_in_process
from tl_keras import data, export

CLASSES = ["cat", "dog", "fox"]


def tool(name, *args, cwd, timeout=600):
    return subprocess.run([sys.executable, os.path.join(TOOLS, name), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def serving_apis():
    pytest.importorskip(
        "tensorflow_serving", reason="pip install --no-deps tensorflow-serving-api (README)")
    from tensorflow_serving import apis
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: F401
    return apis


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, shared_images):
    """`tools/finetune.py ... --export_dir=exports` run as a user runs it (in this
    process: the slow tests run tools/finetune.py in a new one).

    Returns (folder, the finished tool's `ToolResult`, the trained model): the run is
    `folder/run`, its SavedModel `folder/exports/1`.
    """
    root = tmp_path_factory.mktemp("cli")
    result = tool_in_process(
        "finetune.py", "--regime=small_similar", f"--config={ROOT}/configs/smoke.py",
        f"--dataset={shared_images}", "--epochs=2", "--workdir=run", "--export_dir=exports",
        cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    model = keras.saving.load_model(root / "run" / "model.keras", compile=False)
    return root, result, model


@pytest.fixture(scope="module")
def run(cli_run):
    """A finished tiny run, exported by `finetune.py --export_dir` as a user would."""
    root, result, model = cli_run
    assert f"Exported version 1 to exports{os.sep}1" in result.stdout
    return root, model


def test_finetune_cli_runs_a_regime_on_a_folder(cli_run):
    root, result, _ = cli_run
    metrics = json.load(open(root / "run" / "metrics.json"))
    assert metrics["regime"] == "small_similar"
    assert metrics["backbone"] == TINY_BACKBONE
    assert metrics["class_names"] == ["cat", "dog", "fox"]
    assert metrics["epochs_run"] == 2
    assert metrics["train_examples"] + metrics["val_examples"] == 20
    assert "Run folder: run" in result.stdout and "val_accuracy:" in result.stdout


def images(seed=1, n=4, size=TINY_SIZE):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3)).astype("uint8")


def test_layout_is_what_tf_serving_watches(run):
    root, _ = run
    exports = root / "exports"
    assert os.listdir(exports) == ["1"]  # no temporary directory left behind
    version = exports / "1"
    assert {"saved_model.pb", "variables"} <= set(os.listdir(version))
    assert os.stat(version).st_mode & 0o055 == 0o055  # a server running as another user reads it


@pytest.mark.slow  # saved_model_cli in a new process (docs/testing.md)
def test_saved_model_cli_lists_both_signatures_and_finds_no_denylisted_ops(run):
    root, _ = run
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    show = subprocess.run([cli, "show", "--dir", str(root / "exports" / "1"), "--tag_set",
                           "serve", "--all"], capture_output=True, text=True, timeout=300)
    assert show.returncode == 0, show.stderr[-2000:]
    signatures = {}
    for block in re.split(r"\nsignature_def\['", show.stdout)[1:]:
        name = block.split("'", 1)[0]
        tensors = {k: v for k, v in re.findall(
            r"(?:inputs|outputs)\['(\w+)'\] tensor_info:\s+dtype: (\w+\s+shape: \([-\d, ]*\))",
            block)}
        method = re.search(r"Method name is: (\S*)", block).group(1)
        signatures[name] = ({k: " ".join(v.split()) for k, v in tensors.items()}, method)
    outputs = {"probabilities": "DT_FLOAT shape: (-1, 3)", "class_id": "DT_INT64 shape: (-1)",
               "class_name": "DT_STRING shape: (-1)"}
    size = TINY_SIZE
    assert signatures["serving_default"] == (
        {"images": f"DT_FLOAT shape: (-1, {size}, {size}, 3)", **outputs},
        "tensorflow/serving/predict")
    assert signatures["serve_bytes"] == (
        {"image_bytes": "DT_STRING shape: (-1)", **outputs}, "tensorflow/serving/predict")

    scan = subprocess.run([cli, "scan", "--dir", str(root / "exports" / "1")],
                          capture_output=True, text=True, timeout=300)
    assert scan.returncode == 0, scan.stderr[-2000:]
    assert "does not contain the default denylisted ops" in scan.stdout


# Runs in a fresh interpreter that cannot import tl_keras or Keras, as TF Serving
# has neither: TensorFlow alone must load and run the SavedModel.
_ISOLATED = """
import sys
sys.modules["tl_keras"] = None
sys.modules["keras"] = None
import numpy as np
import tensorflow as tf

model = tf.saved_model.load(sys.argv[1])
inputs = np.load(sys.argv[2], allow_pickle=True)
out = {}
for name in ("float", "decoded_jpeg"):
    result = model.signatures["serving_default"](images=tf.constant(inputs[name]))
    out.update({f"{name}_{k}": v.numpy() for k, v in result.items()})
for name in ("png", "jpeg", "large_png"):
    result = model.signatures["serve_bytes"](image_bytes=tf.constant(list(inputs[name])))
    out.update({f"{name}_{k}": v.numpy() for k, v in result.items()})
for name, data in (("not_an_image", b"plain text, not an image"),
                   ("truncated_png", inputs["png"][1][:60]), ("empty", b"")):
    try:
        model.signatures["serve_bytes"](image_bytes=tf.constant([inputs["png"][0], data]))
        out[name] = "no error"
    except tf.errors.OpError as e:
        out[name] = type(e).__name__ + ": " + e.message
try:  # serving_default at another size than the model's
    model.signatures["serving_default"](images=tf.constant(inputs["large_png_pixels"]))
    out["wrong_size"] = "no error"
except tf.errors.OpError as e:
    out["wrong_size"] = type(e).__name__ + ": " + e.message
np.savez(sys.argv[3], **out)
"""


@pytest.mark.slow  # a new Python without tl_keras or Keras (docs/testing.md)
def test_loads_without_tl_keras_and_matches_the_keras_model(run, tmp_path):
    root, model = run
    pixels = images()
    png = [tf.io.encode_png(p).numpy() for p in pixels]
    jpeg = [tf.io.encode_jpeg(p, quality=90).numpy() for p in pixels]
    decoded_jpeg = np.stack([tf.io.decode_jpeg(j).numpy() for j in jpeg]).astype("float32")
    large = images(seed=2, n=2, size=50)  # not the model's size: resized in the graph
    large_png = [tf.io.encode_png(p).numpy() for p in large]
    np.savez(tmp_path / "in.npz", float=pixels.astype("float32"), decoded_jpeg=decoded_jpeg,
             png=np.array(png, dtype=object), jpeg=np.array(jpeg, dtype=object),
             large_png=np.array(large_png, dtype=object), large_png_pixels=large.astype("float32"))
    script = tmp_path / "isolated.py"
    script.write_text(_ISOLATED)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, str(script), str(root / "exports" / "1"), str(tmp_path / "in.npz"),
         str(tmp_path / "out.npz")], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = np.load(tmp_path / "out.npz", allow_pickle=True)

    expected = model.predict(pixels, verbose=0)
    np.testing.assert_allclose(out["float_probabilities"], expected, atol=1e-5)
    np.testing.assert_array_equal(out["float_class_id"], expected.argmax(-1))
    assert [n.decode() for n in out["float_class_name"]] == [
        CLASSES[i] for i in expected.argmax(-1)]
    # PNG is lossless: the same pixels, the same outputs.
    np.testing.assert_allclose(out["png_probabilities"], expected, atol=1e-5)
    # JPEG: the same class as the float endpoint on the pixels it decodes to.
    np.testing.assert_array_equal(out["jpeg_class_id"], out["decoded_jpeg_class_id"])
    np.testing.assert_allclose(out["jpeg_probabilities"], out["decoded_jpeg_probabilities"],
                               atol=1e-5)
    # Another size: resized as training resizes (antialiased, rounded to 0-255).
    resized = tf.clip_by_value(tf.round(tf.image.resize(large, (TINY_SIZE, TINY_SIZE),
                                                        antialias=True)), 0, 255)
    np.testing.assert_allclose(out["large_png_probabilities"],
                               model.predict(resized.numpy(), verbose=0), atol=1e-5)
    # Bytes that are no image: an error that says so, no prediction.
    for name, reason in (("not_an_image", "Unknown image file format"),
                         ("truncated_png", "PNG"), ("empty", "Input is empty")):
        error = str(out[name])
        assert error.startswith("InvalidArgumentError: ") and reason in error, error
    # serving_default takes the model's size only (serve_bytes resizes).
    error = str(out["wrong_size"])
    assert error.startswith("InvalidArgumentError: ") and (
        f"serving_default takes images of {TINY_SIZE}x{TINY_SIZE} pixels; resize them first, "
        "or send encoded images to serve_bytes") in error, error


def pixel_probe(channels):
    """A probe "classifier" whose outputs are the pixels it is given, and its output names."""
    inputs = keras.Input((TINY_SIZE, TINY_SIZE, channels))
    probe = keras.Model(inputs, keras.layers.Flatten()(inputs))
    return probe, [str(i) for i in range(TINY_SIZE * TINY_SIZE * channels)]


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_pixels_reach_the_model_as_training_feeds_them(tmp_path, channels):
    # A probe "classifier" whose outputs are the pixels it is given, so the
    # graph's decoding, resizing and channel conversion are seen exactly.
    probe, names = pixel_probe(channels)
    loaded = tf.saved_model.load(
        export.export(probe, names, str(tmp_path / "exports"), verbose=False))

    def seen(signature, data):
        out = loaded.signatures[signature](data)["probabilities"].numpy()
        return out.reshape(len(out), TINY_SIZE, TINY_SIZE, channels)

    rgb = images(n=2).astype("float32")
    grey = rgb[..., :1]
    alpha = np.full_like(grey, 255)
    # Clients send RGB; a grey model (Fashion-MNIST) gets BT.601 luma, an RGBA one opaque alpha.
    as_model = {1: rgb @ np.array([[0.299], [0.587], [0.114]], "float32"),
                3: rgb, 4: np.concatenate([rgb, alpha], -1)}[channels]
    np.testing.assert_allclose(seen("serving_default", tf.constant(rgb)), as_model, atol=1e-3)
    if channels == 1:  # grey sent as RGB comes back as the same grey
        np.testing.assert_allclose(
            seen("serving_default", tf.constant(np.repeat(grey, 3, -1))), grey, atol=1e-3)

    # Encoded images of another size: decoded and resized by tl_keras's own
    # training pipeline, the same pixels reach the model.
    large = images(seed=2, n=2, size=50)
    examples = data.from_arrays(large, [0, 1], x_val=large, y_val=[0, 1])
    pipeline = data.make_datasets(examples, tiny_config(tmp_path), TINY_SIZE)
    trained_on = np.concatenate([x for x, _ in pipeline.val.as_numpy_iterator()])
    png = tf.constant([tf.io.encode_png(p).numpy() for p in large])
    resized = seen("serving_default", tf.constant(trained_on, tf.float32))
    np.testing.assert_array_equal(seen("serve_bytes", png), resized)
    if channels == 3:
        np.testing.assert_array_equal(resized, trained_on)


def test_rest_and_grpc_requests_as_tf_serving_reads_them(run, tmp_path):
    root, model = run
    pixels = images(n=3)
    paths = []
    for i, p in enumerate(pixels):
        encode = tf.io.encode_png if i % 2 else tf.io.encode_jpeg
        paths.append(tmp_path / f"{i}.{'png' if i % 2 else 'jpg'}")
        paths[-1].write_bytes(encode(p).numpy())
    expected = model.predict(
        np.stack([predict_request.pixels([p.read_bytes()], TINY_SIZE)[0] for p in paths]),
        verbose=0).argmax(-1)
    loaded = tf.saved_model.load(str(root / "exports" / "1"))

    # REST, printed by the tool: TF Serving turns {"b64": ...} into a string tensor.
    result = tool("predict_request.py", *map(str, paths), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    body = json.loads(result.stdout)
    assert body["signature_name"] == "serve_bytes"
    decoded = [base64.b64decode(i["b64"]) for i in body["instances"]]
    assert decoded == [p.read_bytes() for p in paths]
    answer = loaded.signatures[body["signature_name"]](image_bytes=tf.constant(decoded))
    np.testing.assert_array_equal(answer["class_id"].numpy(), expected)

    rest_float = predict_request.rest_body([p.read_bytes() for p in paths], "serving_default",
                                           TINY_SIZE)
    answer = loaded.signatures["serving_default"](
        images=tf.constant(rest_float["instances"], tf.float32))
    np.testing.assert_array_equal(answer["class_id"].numpy(), expected)

    # gRPC: PredictRequest over the wire, tensors via tf.make_ndarray.
    predict_pb2 = serving_apis().predict_pb2

    for signature, key in (("serve_bytes", "image_bytes"), ("serving_default", "images")):
        request = predict_request.grpc_request(
            [p.read_bytes() for p in paths], signature, TINY_SIZE, model_name="fashion")
        received = predict_pb2.PredictRequest.FromString(request.SerializeToString())
        assert (received.model_spec.name, received.model_spec.signature_name) == (
            "fashion", signature)
        tensor = tf.make_ndarray(received.inputs[key])
        answer = loaded.signatures[signature](**{key: tf.constant(tensor)})
        np.testing.assert_array_equal(answer["class_id"].numpy(), expected)
        assert [n.decode() for n in answer["class_name"].numpy()] == [
            CLASSES[i] for i in expected]


def test_predict_request_bad_input_is_one_line(tmp_path, run_tool):
    text = tmp_path / "notes.txt"
    text.write_text("plain text, not an image")
    result = run_tool("predict_request.py", str(text), "--server=localhost:abc", cwd=tmp_path)
    assert result.returncode == 2
    assert result.last_line() == ("predict_request.py: error: --server must be HOST:PORT with a "
                                  "port number, got 'localhost:abc'")
    result = run_tool("predict_request.py", str(text), "--signature=serving_default",
                      f"--image_size={TINY_SIZE}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.last_line() == (
        "predict_request.py: error: image 1 cannot be decoded: Unknown image file format. "
        "One of JPEG, JPEG XL, PNG, GIF, BMP, WebP required.")
    assert "Traceback" not in result.stderr
    # Bounded before any image is decoded (was an out-of-memory traceback after 16 s).
    result = run_tool("predict_request.py", str(text), "--signature=serving_default",
                      "--image_size=100000", cwd=tmp_path)
    assert result.returncode == 2
    assert result.last_line() == ("predict_request.py: error: --image_size must be 1 to 2048 "
                                  "(a model tl_keras builds takes at most that), got 100000")
    from tl_keras import plan as plan_lib

    assert predict_request.MAX_IMAGE_SIZE == plan_lib.MAX_IMAGE_SIZE


def digest(folder):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            h.update(name.encode())
            h.update(open(os.path.join(dirpath, name), "rb").read())
    return h.hexdigest()


def test_a_second_export_is_a_new_version_and_leaves_the_first_alone(tmp_path):
    # A probe model (the versions are what is tested: a finished run's export_run is
    # the CLI run's, above).
    probe, names = pixel_probe(3)
    exports = tmp_path / "exports"
    assert export.export(probe, names, str(exports), verbose=False) == str(exports / "1")
    before = digest(exports / "1")
    assert export.export(probe, names, str(exports), verbose=False) == str(exports / "2")
    assert sorted(os.listdir(exports)) == ["1", "2"]
    assert digest(exports / "1") == before


def test_next_version_skips_every_existing_one(tmp_path):
    for name in ("1", "3", "10", "latest", ".tmp-11-x"):
        os.mkdir(tmp_path / name)
    assert export.next_version(str(tmp_path)) == 11
    assert export.next_version(str(tmp_path / "latest")) == 1


class _Crash(Exception):
    pass


def test_a_crash_while_writing_leaves_no_version(run, tmp_path, monkeypatch):
    _, model = run
    exports = tmp_path / "exports"
    os.makedirs(exports / "1")

    class HalfWritten:
        def write_out(self, path, verbose=True):
            with open(os.path.join(path, "saved_model.pb"), "wb") as f:
                f.write(b"half")
            raise _Crash("disk full")

    monkeypatch.setattr(export, "serving_archive", lambda *a: HalfWritten())
    with pytest.raises(_Crash):
        export.export(model, CLASSES, str(exports))
    assert os.listdir(exports) == ["1"] and os.listdir(exports / "1") == []


def test_export_dir_that_cannot_be_written_is_one_line(run, tmp_path, run_tool):
    root, model = run
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(export.ExportError) as e:
        export.export(model, CLASSES, str(blocker / "exports"))
    assert str(e.value) == f"cannot write to export_dir '{blocker / 'exports'}': Not a directory"

    # Read-only for the user exporting (root ignores permissions, so drop to nobody).
    shared = tempfile.mkdtemp()
    try:
        os.chmod(shared, 0o755)
        readonly = os.path.join(shared, "exports")
        os.mkdir(readonly, 0o555)
        os.chmod(readonly, 0o555)
        root_user = os.geteuid() == 0
        if root_user:
            os.seteuid(65534)
        try:
            with pytest.raises(export.ExportError) as e:
                export.export(model, CLASSES, readonly)
        finally:
            if root_user:
                os.seteuid(0)
        assert str(e.value) == f"cannot write to export_dir {readonly!r}: Permission denied"
        assert os.listdir(readonly) == []
    finally:
        os.chmod(os.path.join(shared, "exports"), 0o755)
        shutil.rmtree(shared, ignore_errors=True)

    result = run_tool("export.py", f"--workdir={tmp_path}", f"--export_dir={tmp_path}/x",
                      cwd=tmp_path)
    assert result.returncode == 2
    assert result.last_line().startswith(
        f"export.py: error: workdir '{tmp_path}' holds no finished run")


def test_finetune_checks_the_export_dir_before_training(tmp_path, shared_images, run_tool):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run_tool("finetune.py", "--regime=small_similar", f"--config={ROOT}/configs/smoke.py",
                      f"--dataset={shared_images}", "--workdir=run", f"--export_dir={blocker}/x",
                      cwd=tmp_path)
    assert result.returncode == 2
    assert result.last_line() == (
        f"finetune.py: error: cannot write to export_dir '{blocker}/x': Not a directory")
    assert not (tmp_path / "run").exists()


def test_requests_reach_a_server_and_its_answers_come_back(run, tmp_path):
    # Stand-ins for tensorflow_model_server (not installable here): its REST
    # URL and row format, its gRPC PredictionService; both run the SavedModel.
    import concurrent.futures
    import http.server
    import threading

    import grpc

    predict_pb2 = serving_apis().predict_pb2
    prediction_service_pb2_grpc = serving_apis().prediction_service_pb2_grpc

    root, model = run
    loaded = tf.saved_model.load(str(root / "exports" / "1"))
    seen = []

    class Rest(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append((self.path, self.headers["Content-Type"]))
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            data = [base64.b64decode(i["b64"]) for i in body["instances"]]
            out = loaded.signatures[body["signature_name"]](image_bytes=tf.constant(data))
            rows = [{"class_id": int(i), "class_name": n.decode()} for i, n in
                    zip(out["class_id"].numpy(), out["class_name"].numpy())]
            answer = json.dumps({"predictions": rows}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    class Grpc(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            seen.append(request.model_spec.name)
            out = loaded.signatures[request.model_spec.signature_name](
                image_bytes=tf.constant(tf.make_ndarray(request.inputs["image_bytes"])))
            response = predict_pb2.PredictResponse()
            for key, value in out.items():
                response.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))
            return response

    http_server = http.server.HTTPServer(("127.0.0.1", 0), Rest)
    threading.Thread(target=http_server.serve_forever, daemon=True).start()
    grpc_server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Grpc(), grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        data = [tf.io.encode_png(p).numpy() for p in images(n=2)]
        expected = [CLASSES[i] for i in model.predict(images(n=2), verbose=0).argmax(-1)]
        answer = predict_request.send_rest(
            predict_request.rest_body(data), f"127.0.0.1:{http_server.server_port}",
            "fashion", timeout=30)
        assert [row["class_name"] for row in answer["predictions"]] == expected
        answer = predict_request.send_grpc(
            predict_request.grpc_request(data, model_name="fashion"), f"127.0.0.1:{port}",
            timeout=30)
        assert [n.decode() for n in answer["class_name"]] == expected
        assert seen == [("/v1/models/fashion:predict", "application/json"), "fashion"]
    finally:
        http_server.shutdown()
        grpc_server.stop(0)
