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

    Args:
      path: a `.pth` file in torch's legacy (non-zip) format.

    Returns:
      dict: parameter name -> numpy array (a copy, C-contiguous, in torch's
      layout, e.g. conv kernels as [out, in, kh, kw]).

    Raises:
      UnsafeCheckpointError: the file names a global a state_dict does not need.
      ValueError: the file is not a legacy state_dict or is truncated.
    """
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
            numel = int(np.frombuffer(f.read(8), "<i8")[0]) if ref.numel else 0
            if numel != ref.numel:
                raise ValueError(f"{path}: storage {key!r} holds {numel} elements, expected {ref.numel}")
            raw = f.read(numel * np.dtype(ref.dtype).itemsize)
            if len(raw) != numel * np.dtype(ref.dtype).itemsize:
                raise ValueError(f"{path}: truncated at storage {key!r}")
            data[key] = np.frombuffer(raw, ref.dtype)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state_dict")
    return {name: _materialize(name, t, data) for name, t in state.items()}


def _materialize(name, t, data):
    if not isinstance(t, _TensorRef):
        raise ValueError(f"state_dict entry {name!r} is not a tensor")
    flat = data[t.storage.key]
    if len(t.size) != len(t.stride):
        raise ValueError(f"state_dict entry {name!r} has {len(t.size)} sizes but {len(t.stride)} strides")
    if any(n == 0 for n in t.size):
        return np.zeros(t.size, flat.dtype)
    # Bounds are checked before striding: a crafted size or stride must not
    # make numpy read memory outside the storage.
    last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride))
    if t.offset < 0 or min(t.stride, default=0) < 0 or last >= flat.size:
        raise ValueError(f"state_dict entry {name!r} reaches outside its storage")
    view = np.lib.stride_tricks.as_strided(
        flat[t.offset:], shape=t.size, strides=[s * flat.itemsize for s in t.stride],
        writeable=False)
    return np.ascontiguousarray(view)
