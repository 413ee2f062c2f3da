"""tools/finetune.py's errors, as a user meets them.

Every error path runs the tool in this process (`run_tool`), as the same
command would; the one run in a new process, exported too, is test_export.py's
(`cli_run`), so that a parallel run (`pytest -n 2 --dist loadfile`) trains it once.
"""

import os

import pytest

from conftest import ROOT


@pytest.mark.parametrize("args, message", [
    (["--regime=medium_similar"],
     "finetune.py: error: unknown regime 'medium_similar'; valid regimes: "
     "small_similar, small_different, large_similar, large_different"),
    (["--regime=small_similar", "--backbone=resnet5", "--dataset=IMAGES", "--weights=none"],
     "finetune.py: error: unknown backbone 'resnet5'; valid backbones: efficientnet_lite0, "),
    (["--regime=small_similar", "--epochs=many"],
     "finetune.py: error: flag --epochs=many: invalid literal for int()"),
    (["--regime=small_similar", "--config.no_such_key=1"],
     "finetune.py: error: unknown config key 'no_such_key' (every key is in configs/base.py)"),
    (["--regime=small_different", f"--config={ROOT}/configs/smoke.py", "--cut=conv9",
      "--dataset=IMAGES"],
     "finetune.py: error: unknown cut 'conv9' for backbone 'mobilenet_v3_small_minimalistic'; "
     "named cut points: early, middle, late, top; nearest layer names: "),
    (["--regime=small_similar", "--batch_size=0"],
     "finetune.py: error: batch_size must be at least 1, got 0"),
    (["--regime=small_similar", "--config.early_stopping=1", "--config.layer_decay=0.5"],
     "finetune.py: error: layer_decay, early_stopping set how phases that train the backbone "
     "train, and regime 'small_similar' trains only the head; leave those keys unset, or "
     "choose large_similar or large_different"),
    (["--flagfile=/nonexistent.flags"],
     "finetune.py: error: Unable to open flagfile: [Errno 2] No such file or directory: "
     "'/nonexistent.flags'"),
    (["--regime=auto", "--config.advisor.scratch_margin=-1"],
     "finetune.py: error: advisor.scratch_margin must be 0 or more, got -1"),
    (["--regime=auto", "--config.advisor.costlier_margin=-0.5"],
     "finetune.py: error: advisor.costlier_margin must be 0 or more, got -0.5"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, shared_images, run_tool, args, message):
    args = [a.replace("IMAGES", str(shared_images)) for a in args]
    result = run_tool("finetune.py", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.last_line().startswith(message), result.last_line()
    assert "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []  # no run folder, nothing written


def test_cli_bad_config_files_are_one_line(tmp_path, run_tool):
    (tmp_path / "no_get_config.py").write_text("def nothing():\n    pass\n")
    (tmp_path / "returns_none.py").write_text("def get_config():\n    return None\n")
    (tmp_path / "syntax.py").write_text("def get_config(:\n")
    (tmp_path / "raises.py").write_text("def get_config():\n    raise RuntimeError('no')\n")
    (tmp_path / "imports.py").write_text("import no_such_module\n")
    (tmp_path / "binary.py").write_bytes(bytes(range(256)))
    for name, message in (
            ("missing.py", "config file '{path}' does not exist (--config=FILE[:ARG], e.g. "),
            ("no_get_config.py", "config file '{path}' has no get_config() (see configs/base.py)"),
            ("returns_none.py", "get_config() of '{path}' returned NoneType, not an "
                                "ml_collections.ConfigDict"),
            ("syntax.py", "cannot load config file '{path}': SyntaxError: "),
            ("raises.py", "cannot load config file '{path}': RuntimeError: no"),
            ("imports.py", "cannot load config file '{path}': ModuleNotFoundError: "),
            ("binary.py", "cannot load config file '{path}': ")):
        path = str(tmp_path / name)
        for args in ([f"--config={path}"], ["--config", path]):  # both ways absl takes a value
            result = run_tool("finetune.py", *args, cwd=tmp_path)
            assert result.returncode == 2, name
            assert result.last_line().startswith(
                "finetune.py: error: " + message.format(path=path))
            assert "Traceback" not in result.stderr


def test_a_config_file_with_some_keys_takes_the_others_from_base(tmp_path, run_tool):
    # The probe's file: a bare ConfigDict with two keys (was a KeyError traceback). The
    # rest comes from configs/base.py, so the run goes on to read its data: here a
    # folder that does not exist, whose one-line error proves it got that far.
    (tmp_path / "partial.py").write_text(
        "import ml_collections\n\n\ndef get_config():\n"
        "    c = ml_collections.ConfigDict()\n    c.regime = 'small_similar'\n"
        "    c.backbone = 'mobilenet_v3_small'\n    return c\n")
    result = run_tool("finetune.py", f"--config={tmp_path / 'partial.py'}",
                      f"--dataset={tmp_path / 'no_images'}", "--weights=none",
                      f"--workdir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "no_images" in result.last_line() and "KeyError" not in result.last_line()


def test_a_finished_run_is_refused_before_the_data_is_read(tmp_path, run_tool, monkeypatch):
    from tl_keras import data

    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before the run folder was checked")

    monkeypatch.setattr(data, "load", no_data)
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "metrics.json").write_text("{}")
    result = run_tool("finetune.py", f"--config={ROOT}/configs/smoke.py", "--dataset=digits",
                      "--workdir=done/", cwd=tmp_path)
    assert result.returncode == 2
    assert result.last_line() == ("finetune.py: error: workdir 'done' already holds a finished "
                                  "run; choose another --workdir")
    assert os.listdir(tmp_path / "done") == ["metrics.json"]


def test_a_full_disk_is_one_line_and_leaves_no_half_written_model(tmp_path, shared_images,
                                                                    run_tool, monkeypatch):
    import keras

    def save_half_then_fill_the_disk(self, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keras.Model, "save", save_half_then_fill_the_disk)
    result = run_tool("finetune.py", f"--config={ROOT}/configs/smoke.py", "--epochs=1",
                      f"--dataset={shared_images}", "--workdir=run", "--config.verbose=0",
                      cwd=tmp_path)
    assert result.returncode == 2
    assert result.last_line() == (
        "finetune.py: error: [Errno 28] No space left on device (nothing is half-written; "
        "the same command resumes the run)")
    assert "Traceback" not in result.stderr
    left = sorted(os.listdir(tmp_path / "run"))
    assert "best.keras" not in left and "metrics.json" not in left
    assert not [name for name in left if "partial" in name]


@pytest.mark.parametrize("args, message", [
    (["--cut=conv9"], "unknown cut 'conv9' for backbone 'mobilenet_v3_small_minimalistic'; "
                      "named cut points: "),
    (["--weights=OTHER"], "could not load weights 'OTHER' into 'mobilenet_v3_small_minimalistic' "
                          "built with include_top=False: 62 layers do not match it; was it "
                          "saved from another backbone?"),
])
def test_the_backbone_is_checked_before_the_data_is_read(tmp_path, run_tool, monkeypatch,
                                                        args, message):
    from tl_keras import backbones, data

    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before the backbone was checked")

    other = str(tmp_path / "v2.weights.h5")
    backbones.build_backbone("mobilenet_v2", weights="none", image_size=32).base.save_weights(other)
    monkeypatch.setattr(data, "load", no_data)
    result = run_tool("finetune.py", f"--config={ROOT}/configs/smoke.py", "--dataset=digits",
                      "--regime=small_different", *[a.replace("OTHER", other) for a in args],
                      "--workdir=run", cwd=tmp_path)
    assert result.returncode == 2
    assert result.last_line().startswith("finetune.py: error: " + message.replace("OTHER", other))
    assert not (tmp_path / "run").exists()


def test_cli_imagenet_weights_without_network_is_one_line(tmp_path, shared_images, run_tool,
                                                          monkeypatch):
    # No network: every HTTPS request goes to a closed local port. An empty
    # Keras cache makes sure no cached download hides the failure.
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setattr("keras.src.backend.config._KERAS_DIR", str(tmp_path / "keras_home"))
    result = run_tool("finetune.py", "--regime=small_similar", "--backbone=resnet50",
                      "--weights=imagenet", "--image_size=32", f"--dataset={shared_images}",
                      "--workdir=out", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.last_line()
    assert line.startswith("finetune.py: error: could not download ImageNet weights for 'resnet50'")
    for hint in ("network", "--weights=PATH.weights.h5", "efficientnet_lite0"):
        assert hint in line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_default_run_is_offline_pretrained():
    from tl_keras import backbones, plan as plan_lib
    from tl_keras.configs import small_similar

    plan = plan_lib.resolve(small_similar.get_config())
    config = plan.config
    assert (config.backbone, plan.weights, config.dataset, plan.image_size) == (
        "efficientnet_lite0", "imagenet", "fashion_mnist", 96)
    assert config.backbone in backbones.OFFLINE_IMAGENET


# As on a machine where `pip install -e .` brought no TensorFlow: importing it fails.
_WITHOUT_TENSORFLOW = """
import os, runpy, sys

class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            raise ImportError(f"No module named {name!r} (blocked: no TensorFlow here)")

sys.meta_path.insert(0, NoTensorFlow())
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))  # as `python tools/X.py` does
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("tool", ["finetune.py", "tune.py", "export.py", "benchmark.py"])
def test_without_tensorflow_every_tool_says_which_extra_to_install(tmp_path, tool):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["KERAS_HOME"] = str(tmp_path)  # no keras.json naming another backend
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TENSORFLOW, os.path.join(ROOT, "tools", tool),
         "--regime=small_similar"] if tool in ("finetune.py", "tune.py") else
        [sys.executable, "-c", _WITHOUT_TENSORFLOW, os.path.join(ROOT, "tools", tool)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"{tool}: error: TensorFlow is not installed, and Keras runs on it here: install "
        "tl_keras with one of its extras, pip install -e '.[cpu]' (no GPU: the small "
        "tensorflow-cpu) or -e '.[gpu]' (NVIDIA GPUs)"]
    assert os.listdir(tmp_path) == []


@pytest.fixture
def run_main(monkeypatch):
    """`tools/_common.run(main)` as the tool named `name` runs it: its exit code."""
    import sys

    from conftest import TOOLS

    monkeypatch.syspath_prepend(TOOLS)
    import _common

    def run(main, name="tool"):
        monkeypatch.setattr(sys, "argv", [name])
        with pytest.raises(SystemExit) as e:
            _common.run(main)
        return e.value.code

    return run


def test_a_tools_main_runs_with_its_imports_frozen_and_returns_them_to_the_collector(
        run_main):
    # gc.freeze keeps Python's full collections (and the one at exit, 1.0-1.5 s)
    # off TensorFlow's and Keras' objects; a caller that goes on gets them back.
    import gc

    frozen = []
    assert run_main(lambda argv: frozen.append(gc.get_freeze_count())) in (0, None)
    assert frozen[0] > 10_000  # Keras and TensorFlow are imported here
    assert gc.get_freeze_count() == 0


def test_ctrl_c_masked_by_a_context_managers_error_still_stops_in_one_line(run_main, capsys):
    # Ctrl-C during the advisor's pilots: TensorFlow's variable_creator_scope raised its
    # own RuntimeError while unwinding, a traceback with exit 1. The interrupt behind it
    # now stops the tool as any Ctrl-C does.
    def main(argv):
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("Exiting variable_creator_scope without proper nesting")

    assert run_main(main, "advise.py") == 130
    assert capsys.readouterr().err.strip() == "advise.py: stopped by SIGINT"
    with pytest.raises(RuntimeError, match="an error of its own"):  # others go on as they are
        run_main(lambda argv: (_ for _ in ()).throw(RuntimeError("an error of its own")))


def test_signals_reach_the_main_thread_never_a_thread_the_tool_made(run_main, capsys):
    # A SIGINT the kernel delivered into one of TensorFlow's threads during a training
    # step aborted the process ("corrupted double-linked list") in about 1 try in 5: the
    # tool's threads block SIGINT and SIGTERM, one waiting thread hands them to the main one.
    import signal
    import threading
    import time

    seen = {}

    def main(argv):
        seen["main"] = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        worker = threading.Thread(
            target=lambda: seen.setdefault("thread", signal.pthread_sigmask(signal.SIG_BLOCK, [])))
        worker.start()
        worker.join()
        os.kill(os.getpid(), signal.SIGTERM)  # as `timeout` or a scheduler sends it
        for _ in range(200):
            time.sleep(0.05)
        raise AssertionError("SIGTERM did not stop the tool")

    assert run_main(main, "finetune.py") == 143
    assert capsys.readouterr().err.strip() == "finetune.py: stopped by SIGTERM"
    assert {signal.SIGINT, signal.SIGTERM} <= seen["main"] & seen["thread"]
    assert not {signal.SIGINT, signal.SIGTERM} & signal.pthread_sigmask(signal.SIG_BLOCK, [])


@pytest.mark.slow
def test_ctrl_c_and_sigterm_stop_in_one_line_and_the_run_resumes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    workdir = tmp_path / "run"
    command = [sys.executable, os.path.join(ROOT, "tools", "finetune.py"),
               f"--config={ROOT}/configs/smoke.py:large_similar", "--dataset=digits",
               "--epochs=8", "--max_examples=128", "--config.verbose=2",
               f"--workdir={workdir}"]

    def stopped_in_fit(signum):
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, cwd=tmp_path)
        seen = ""
        while "Epoch 3/" not in seen:  # in the middle of fit, through the backbone
            line = process.stdout.readline()
            assert line, "the run ended before its third epoch"
            seen += line
        process.send_signal(signum)
        began = time.time()
        _, err = process.communicate(timeout=60)
        return process.returncode, err, time.time() - began

    for signum in (signal.SIGINT, signal.SIGTERM):
        code, err, seconds = stopped_in_fit(signum)
        assert code == 128 + signum and seconds < 30
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1] == (
            f"finetune.py: stopped by {signal.Signals(signum).name}; nothing is half-written, "
            "and the same command resumes the run")
        assert not os.path.exists(workdir / "metrics.json")
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Resuming the unfinished run" in done.stdout
    history = open(workdir / "history.csv").read().splitlines()
    assert history[-1].startswith("7,")  # every epoch, to the last


@pytest.mark.parametrize("tool, args, message", [
    ("benchmark.py", ["--speed=7"], "benchmark.py: error: --speed must be one of 0, 1, 2, got 7"),
    ("benchmark.py", ["stray"], "benchmark.py: error: unexpected arguments: stray"),
    ("benchmark.py", ["--out=OUT"], "benchmark.py: error: --out='OUT' is a folder; name the "
                                    "results file"),
    ("benchmark.py", ["--epochs=-1"], "benchmark.py: error: --epochs must be 0 or more, got -1"),
    ("benchmark.py", ["--dataset=bogus"],
     "benchmark.py: error: unknown dataset 'bogus'; valid: fashion_mnist, digits"),
    ("benchmark.py", ["--weights=bogus"],
     "benchmark.py: error: unknown weights 'bogus'; valid: imagenet, none"),
    ("benchmark.py", ["--batch_size=0"], "benchmark.py: error: --batch_size must be at least 1, "
                                         "got 0"),
    ("benchmark.py", ["--epochs=0"], "benchmark.py: error: --epochs must be at least 1, got 0"),
    ("benchmark.py", ["--out=/etc/passwd/x.json"],
     "benchmark.py: error: out '/etc/passwd' is a file, not a folder; choose another --out"),
    ("lr_find.py", ["--max_rate=inf"], "lr_find.py: error: max_rate must be a finite number, "
                                       "got inf"),
    ("lr_find.py", ["--max_rate=1e30", "--steps=10"],
     "lr_find.py: error: 10 steps over 37.0 decades (1e-07 to 1e+30) try 0.3 rates per factor "
     "of 10; give at least 4: --steps=148 or a narrower --min_rate/--max_rate"),
    ("lr_find.py", ["--min_rate=1", "--max_rate=0.5"],
     "lr_find.py: error: need 0 < min_rate < max_rate, got 1.0 and 0.5"),
    ("study.py", ["--quick", "--out=/etc/passwd"],
     "study.py: error: out '/etc/passwd' is a file, not a folder; choose another --out"),
    ("study.py", ["--quick", "--out=/etc/passwd/x"],
     "study.py: error: cannot create out '/etc/passwd/x': '/etc/passwd' is a file; "
     "choose another --out"),
    ("study.py", ["--advisor", "--out=OUT/none"],
     "study.py: error: --advisor judges a finished study, and 'OUT/none' holds no study.json: "
     "run python tools/study.py first, or name its results folder with --out"),
    ("export.py", ["--workdir=OUT", "--export_dir=OUT/e", "--format=litert",
                   "--calibration_images=-5"],
     "export.py: error: --calibration_images must be at least 1, got -5"),
    ("export.py", ["--workdir=OUT", "--export_dir=OUT/e", "--eval_images=-1"],
     "export.py: error: --eval_images must be 0 (all) or more, got -1"),
])
def test_tool_settings_are_checked_before_the_work(tmp_path, run_tool, tool, args, message):
    args = [a.replace("OUT", str(tmp_path)) for a in args]
    result = run_tool(tool, *args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.last_line() == message.replace("OUT", str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_an_unknown_benchmark_backbone_is_one_line_before_the_work(tmp_path, run_tool):
    result = run_tool("benchmark.py", "--backbone=resnet9000", cwd=tmp_path)
    assert result.returncode == 2
    assert result.last_line().startswith(
        "benchmark.py: error: unknown backbone 'resnet9000'; valid backbones: efficientnet_lite0")
    assert os.listdir(tmp_path) == []


def test_workdir_errors_that_are_not_a_full_disk_promise_nothing(tmp_path, run_tool):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for workdir, message in ((tmp_path / ("x" * 300), "File name too long"),
                             (tmp_path / "loop" / "run", "Too many levels of symbolic links")):
        result = run_tool("finetune.py", f"--config={ROOT}/configs/smoke.py",
                          "--dataset=digits", f"--workdir={workdir}", cwd=tmp_path)
        assert result.returncode == 2 and message in result.last_line(), result.last_line()
        assert "resumes" not in result.last_line() and "Traceback" not in result.stderr


def test_a_full_disk_during_export_is_one_line(tmp_path, run_tool, monkeypatch):
    import tensorflow as tf

    from tl_keras import export

    def fill_the_disk(*args, **kwargs):  # TensorFlow's own words, as a full disk gives them
        raise tf.errors.ResourceExhaustedError(
            None, None, "{{function_node __wrapped__SaveV2_dtypes_1_device_/job:localhost}} "
                        "/e/1/variables/variables_temp/part-00000-of-00001.data-00000-of-00001."
                        "tempstate123; No space left on device [Op:SaveV2]")

    monkeypatch.setattr(export, "export_run", fill_the_disk)
    result = run_tool("export.py", f"--workdir={tmp_path}", f"--export_dir={tmp_path}/e",
                      cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.last_line() == (f"export.py: error: no space left on device writing "
                                  f"{tmp_path}/e (no version was published)")

    def other_error(*args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")

    monkeypatch.setattr(export, "export_run", other_error)
    result = run_tool("export.py", f"--workdir={tmp_path}", f"--export_dir={tmp_path}/e",
                      cwd=tmp_path)
    assert result.last_line() == ("export.py: error: ResourceExhaustedError: OOM when "
                                  "allocating tensor (no version was published)")
