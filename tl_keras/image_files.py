"""Image files checked once: every file of a folder decoded before any training, the
ones that cannot be named with their reason, and what was found kept between starts.

    paths --check_images--> [(path, reason)] of the files TensorFlow cannot decode
          (a `CheckedFiles` manifest: an unchanged file is not decoded again)

data.py reads folders through it; predict.py checks the files it is given.

Example:
    bad = check_images(paths, CheckedFiles(root))   # [("a/x.jpg", "Input is empty.")]
"""

import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import sys

import keras
import tensorflow as tf

from tl_keras import run_folder

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def listing(title, lines, shown=5):
    """`title:` and the first `shown` lines, indented, then how many more."""
    more = [f"... and {len(lines) - shown} more"] if len(lines) > shown else []
    return "\n  ".join([title + ":", *lines[:shown], *more])


def listdir(folder, what):
    """`os.listdir(folder)`; a folder that cannot be read is a one-line `ValueError`."""
    try:
        return os.listdir(folder)
    except OSError as e:
        raise ValueError(f"cannot read {what} {folder!r}: {e.strerror}") from None


def decode(path):
    """The image file at `path` (a string tensor) as uint8 [H, W, 3]; a GIF's first frame."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=3,
                               expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _check_file(path):
    """Why TensorFlow cannot decode the file at `path`, or None when it can."""
    try:
        image = decode(tf.constant(path))
        if image.shape[0] == 0 or image.shape[1] == 0:
            return "empty image"
    except (tf.errors.OpError, ValueError) as e:
        return _short_reason(e.message if hasattr(e, "message") else str(e))
    return None


def check_images(paths, manifest=None):
    """[(path, reason)] for each file TensorFlow cannot decode, in order.

    With a `CheckedFiles` manifest, a file it holds unchanged (same size and
    modification time) is not decoded again; the others are, and are recorded.
    """
    known = manifest.known(paths) if manifest is not None else {}
    todo = [p for p in paths if p not in known]
    progress = keras.utils.Progbar(len(todo), unit_name="file") if len(todo) > 2000 else None
    found = {}
    with _native_stderr_dropped(), \
            concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for i, (path, reason) in enumerate(zip(todo, pool.map(_check_file, todo))):
            found[path] = reason
            if progress and (i + 1) % 500 == 0:
                progress.update(i + 1)
    if progress:
        progress.update(len(todo), finalize=True)
    if manifest is not None and todo:
        manifest.save(found)
    reasons = {**known, **found}
    return [(p, reasons[p]) for p in paths if reasons[p]]


class CheckedFiles:
    """What decoding each file of an image folder found, kept between starts:
    relative path -> [size, mtime_ns, reason or None], in one JSON file per folder
    under `$TL_KERAS_CACHE` (default ~/.cache/tl_keras) `/checked/`, written whole.

    A second start on an unchanged folder decodes nothing to check it; a file
    whose size or modification time changed is decoded again. The dataset
    folder itself is never written to.
    """

    def __init__(self, root):
        self.root = os.path.realpath(root)
        digest = hashlib.sha1(self.root.encode()).hexdigest()[:16]
        self.path = run_folder.cache_path("checked", f"{digest}.json")
        self.entries, self.stats = {}, {}
        try:
            with open(self.path) as f:
                saved = json.load(f)
            if saved.get("root") == self.root:
                self.entries = saved["files"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass  # none yet, or unreadable: every file is checked

    def _key(self, path):
        return os.path.relpath(os.path.realpath(path), self.root)

    def known(self, paths):
        """{path: reason or None} of `paths` the manifest holds unchanged."""
        out = {}
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                continue  # checked (and reported) by decoding
            self.stats[path] = [st.st_size, st.st_mtime_ns]
            entry = self.entries.get(self._key(path))
            if entry is not None and entry[:2] == self.stats[path]:
                out[path] = entry[2]
        return out

    def save(self, found):
        """Records `found` {path: reason or None}; a cache that cannot be written is skipped."""
        for path, reason in found.items():
            if path in self.stats:
                self.entries[self._key(path)] = [*self.stats[path], reason]
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            run_folder.write_json(self.path, {"root": self.root, "files": self.entries},
                                  indent=None)
        except OSError as e:
            print(f"warning: cannot keep the checked-files manifest {self.path!r} "
                  f"({e.strerror}); the next start checks every file again", file=sys.stderr)


def _short_reason(message):
    """TensorFlow's decode error without its op names: "Input is empty."."""
    line = (message.strip().splitlines() or ["cannot be decoded"])[0]
    line = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", line)
    return re.sub(r"\s*\[Op:\w+\].*$", "", line) or "cannot be decoded"


@contextlib.contextmanager
def _native_stderr_dropped():
    """Drops what native code writes to file descriptor 2 meanwhile.

    libjpeg and TensorFlow's logging print a line of their own for each bad
    file ("Premature end of JPEG data"); `check_images` reports each bad file
    once, with its reason, instead.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except OSError:  # no file descriptor 2
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
