"""The torch-free state_dict reader: right arrays back, and nothing else runs."""

import collections
import os
import pickle
import sys
import types

import numpy as np
import pytest

from tl_keras import torch_state_dict


def _fake_torch(monkeypatch):
    """Stand-ins named like torch's globals, so pickle writes what torch.save writes."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while writing")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    for name in ("FloatStorage", "LongStorage"):
        cls = type(name, (), {"__module__": "torch", "__qualname__": name})
        setattr(torch, name, cls)
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


def write_legacy(path, tensors, monkeypatch):
    """Writes {name: (storage array, offset, size, stride)} in torch's legacy layout."""
    torch = _fake_torch(monkeypatch)

    class Storage:
        def __init__(self, key, array):
            self.key, self.array = key, array

    class Tensor:
        def __init__(self, storage, offset, size, stride):
            self.args = (storage, offset, size, stride, False, collections.OrderedDict())

        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, self.args

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                kind = torch.LongStorage if obj.array.dtype == np.int64 else torch.FloatStorage
                return ("storage", kind, obj.key, "cpu", obj.array.size, None)
            return None

    state, storages = collections.OrderedDict(), {}
    for i, (name, (array, offset, size, stride)) in enumerate(tensors.items()):
        storages[str(i)] = Storage(str(i), array)
        state[name] = Tensor(storages[str(i)], offset, size, stride)
    with open(path, "wb") as f:
        for header in (torch_state_dict.MAGIC_NUMBER, torch_state_dict.PROTOCOL_VERSION,
                       {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        Pickler(f, protocol=2).dump(state)
        pickle.dump(list(storages), f, protocol=2)
        for storage in storages.values():
            f.write(np.int64(storage.array.size).tobytes())
            f.write(storage.array.tobytes())


def test_reads_tensors_with_their_strides(tmp_path, monkeypatch):
    kernel = np.arange(2 * 3 * 4, dtype="float32").reshape(4, 3, 2)  # stored [kw, in, out]
    path = tmp_path / "sd.pth"
    write_legacy(path, {
        # A [out=2, in=3, kw=4] view of a channels-last buffer, as in the EfficientNet-Lite files.
        "conv.weight": (kernel.ravel(), 0, (2, 3, 4), (1, 2, 6)),
        "bias": (np.array([9, 1.5, 2.5, 3.5], "float32"), 1, (3,), (1,)),
        "steps": (np.array([7], "int64"), 0, (), ()),
    }, monkeypatch)
    arrays = torch_state_dict.load(path)
    assert list(arrays) == ["conv.weight", "bias", "steps"]
    np.testing.assert_array_equal(arrays["conv.weight"], kernel.transpose(2, 1, 0))
    assert arrays["conv.weight"].flags.c_contiguous
    np.testing.assert_array_equal(arrays["bias"], [1.5, 2.5, 3.5])
    assert arrays["steps"] == 7 and arrays["steps"].dtype == np.int64


def test_a_view_reaching_outside_its_storage_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "sd.pth"
    write_legacy(path, {"w": (np.zeros(4, "float32"), 1, (2,), (3,))}, monkeypatch)
    with pytest.raises(ValueError, match="'w' reaches outside its storage"):
        torch_state_dict.load(path)


def test_a_zero_stride_tensor_cannot_allocate_more_than_the_file_holds(tmp_path, monkeypatch):
    # 242 bytes used to allocate 800 MB: one float repeated 10,000 x 10,000 x 2 times.
    path = tmp_path / "sd.pth"
    write_legacy(path, {"w": (np.zeros(1, "float64").view("float32"), 0, (10_000, 10_000, 2),
                              (0, 0, 0))}, monkeypatch)
    assert os.path.getsize(path) < 400
    with pytest.raises(ValueError, match="far more than its storages"):
        torch_state_dict.load(path)
    write_legacy(path, {"w": (np.zeros(4, "float32"), 0, (5,), (0,)),
                        "b": (np.zeros(64, "float32"), 0, (64,), (1,))}, monkeypatch)
    with pytest.raises(ValueError, match="'w' holds more elements than its storage"):
        torch_state_dict.load(path)


def test_a_truncated_file_is_a_value_error(tmp_path, monkeypatch):
    path = tmp_path / "sd.pth"
    write_legacy(path, {"w": (np.arange(6, dtype="float32"), 0, (2, 3), (3, 1))}, monkeypatch)
    whole = path.read_bytes()
    for cut in (len(whole) - 4, len(whole) - 24, len(whole) - 30, 40, 3, 0):
        path.write_bytes(whole[:cut])
        with pytest.raises(ValueError, match="truncated|wrong magic number"):
            torch_state_dict.load(path)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("position", ["magic", "state_dict"])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, position):
    marker = tmp_path / "pwned"
    payload = RunsCode(marker)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        if position == "magic":
            pickle.dump(payload, f, protocol=2)
        else:
            pickle.dump(torch_state_dict.MAGIC_NUMBER, f, protocol=2)
            pickle.dump(torch_state_dict.PROTOCOL_VERSION, f, protocol=2)
            pickle.dump({}, f, protocol=2)
            pickle.dump(collections.OrderedDict(w=payload), f, protocol=2)
    # The payload is real: plain pickle runs it.
    pickle.loads(pickle.dumps(RunsCode(tmp_path / "proof"), protocol=2))
    assert (tmp_path / "proof").exists()
    with pytest.raises(torch_state_dict.UnsafeCheckpointError,
                       match=r"refusing to load global (posix|os)\.system"):
        torch_state_dict.load(path)
    assert not marker.exists()


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "x.pth"
    path.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(ValueError, match="wrong magic number"):
        torch_state_dict.load(path)
    path.write_bytes(b"PK\x03\x04zip")
    with pytest.raises(ValueError, match="zip-format"):
        torch_state_dict.load(path)
