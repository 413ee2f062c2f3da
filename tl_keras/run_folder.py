"""The run folder: how a run (and a sweep) is started, resumed, refused and written.

    config.json     every resolved setting (`Plan.to_dict`)
    history.csv     one row per epoch, across phases
    logs/           TensorBoard (when TensorFlow is installed)
    best.keras      the model with the best val_accuracy so far
    model.keras     the final model
    metrics.json    what the run measured; written last, so it marks a finished run
    backup/         BackupAndRestore state while a run is unfinished
    features/       cached backbone features, only while a run is unfinished and
                    only when they do not fit in `feature_cache_bytes` of memory

A folder with metrics.json is never written again; one with another run's
config.json is refused with the keys that differ; an unfinished run with the
same config resumes. A sweep folder (tune.py) follows the same rules with its
sweep.json. Every file (JSON, models, weights) is written to a temporary name
and renamed (`write_atomically`), so a crash or a full disk leaves the old
file or the new one, never half of one.

Example:
    workdir = prepare(plan.config.workdir, plan.to_dict())
    write_json(os.path.join(workdir, "metrics.json"), metrics)
"""

import csv
import json
import os
import re


class RunFolderError(ValueError):
    """The workdir holds a finished run or another run's config."""


def prepare(workdir, settings, name="config.json", kind="run"):
    """Creates `workdir` and writes `settings` to `workdir/name`; resumes an unfinished run.

    A run holds `workdir/.lock` until it finishes (`release`) or its process ends,
    killed included: a second process started into the same workdir is refused
    (a sweep's folder is shared by its tuner processes and takes no lock).
    Half-written files a killed run left (`write_atomically`'s temporary names)
    are removed. Raises `RunFolderError` as `check` does: nothing is overwritten.
    Returns `workdir`.
    """
    resuming = check(workdir, settings, name, kind)
    os.makedirs(workdir, exist_ok=True)
    if kind == "run":
        lock(workdir)
        check(workdir, settings, name, kind)  # again, now that no one else can write
        remove_partial_files(workdir)
    if resuming:
        print(f"Resuming the unfinished {kind} in {workdir}")
    write_json(os.path.join(workdir, name), settings)
    return workdir


_LOCKS = {}  # workdir -> the open .lock file this process holds


def lock(workdir):
    """Holds `workdir/.lock` (flock) for this process; `RunFolderError` when another holds it."""
    import fcntl

    key = os.path.realpath(workdir)
    if key in _LOCKS:  # this process holds it already (a run resumed in the same process)
        return
    f = open(os.path.join(workdir, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise RunFolderError(f"workdir {workdir!r} is in use by another run (process "
                             f"{holder}); wait for it to end, or choose another --workdir")
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _LOCKS[key] = f


def release(workdir):
    """Lets go of `workdir/.lock` and removes it (a finished run: metrics.json is written,
    so a process that opened the lock meanwhile refuses the folder all the same)."""
    f = _LOCKS.pop(os.path.realpath(workdir), None)
    if f is not None:
        os.remove(f.name)
        f.close()


def remove_partial_files(workdir):
    """Removes the temporary files of `write_atomically` that a killed process left in
    `workdir` and its `backup/` (this process holds the lock: no one writes them)."""
    for folder in (workdir, os.path.join(workdir, "backup")):
        if os.path.isdir(folder):
            for entry in os.listdir(folder):
                if _PARTIAL.match(entry):
                    os.remove(os.path.join(folder, entry))


def check(workdir, settings, name="config.json", kind="run"):
    """Whether `workdir` holds an unfinished run of `settings` to resume (else it is new).

    Raises `RunFolderError` if the workdir holds a finished run (metrics.json),
    an unfinished one whose saved `name` differs from `settings`, or anything
    else. Reads only: tools call it before loading any data.
    """
    if not workdir:
        raise ValueError("config.workdir is not set")
    saved = os.path.join(workdir, name)
    refuse_finished(workdir)
    if os.path.exists(saved):
        try:
            with open(saved) as f:
                previous = json.load(f)
        except (OSError, ValueError) as e:  # a folder, unreadable, not JSON
            previous = e
        if not isinstance(previous, dict):
            raise RunFolderError(
                f"workdir {workdir!r} holds a {name} that is not a {kind}'s settings "
                "(a JSON object); choose another --workdir")
        changed = differing_keys(previous, settings)
        if changed:
            holds = ("an unfinished run with another config" if kind == "run"
                     else f"a {kind} with other settings")
            raise RunFolderError(
                f"workdir {workdir!r} holds {holds} (differs in: {_few(changed)}); "
                "re-run it with the same settings to resume, or choose another --workdir")
        return True
    if os.path.isdir(workdir) and set(os.listdir(workdir)) - {".lock"}:
        raise RunFolderError(
            f"workdir {workdir!r} is not empty and holds no tl_keras {kind}; "
            "choose another --workdir")
    return False


def _few(names, most=8):
    """`names` joined, at most `most` of them and how many more."""
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def differing_keys(old, new):
    """The keys whose values differ between two dicts, sorted; nested dicts by their keys."""
    changed = set()
    for key in set(old) | set(new):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed |= set(differing_keys(a, b))
        elif a != b:
            changed.add(key)
    return sorted(changed)


def refuse_finished(workdir):
    """Raises `RunFolderError` when `workdir` holds a finished run; returns `workdir`."""
    if os.path.exists(os.path.join(workdir, "metrics.json")):
        raise RunFolderError(
            f"workdir {workdir!r} already holds a finished run; choose another --workdir")
    return workdir


_PARTIAL = re.compile(r"^\..+\.\d+\.partial(\.[\w.]+)?$")  # write_atomically's temporary names


def cache_path(*parts):
    """A path under tl_keras's cache, `$TL_KERAS_CACHE` (default ~/.cache/tl_keras)."""
    cache = os.environ.get("TL_KERAS_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "tl_keras")
    return os.path.join(cache, *parts)


def write_atomically(path, write):
    """Calls `write(tmp)` for a temporary path beside `path`, then renames it to `path`.

    A crash or a full disk leaves the old file or the new one, never half of
    one, and no temporary file. The temporary name keeps the extension
    (`.keras`, `.weights.h5`), which Keras' savers require.
    """
    folder, name = os.path.split(path)
    suffix = ".weights.h5" if name.endswith(".weights.h5") else os.path.splitext(name)[1]
    tmp = os.path.join(folder, f".{name[:len(name) - len(suffix)]}.{os.getpid()}.partial{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, value, indent=2):
    """`value` as JSON at `path` (indented unless `indent=None`), written whole or not at all."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(value, f, indent=indent)
            f.write("\n")

    write_atomically(path, write)


def write_text(path, text):
    """`text` at `path`, written whole or not at all."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    write_atomically(path, write)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_history(workdir, first_epoch=0, last_epoch=None, with_epoch=False):
    """Rows {column: float} of `workdir/history.csv` (CSVLogger's, counting epochs from
    0) for epochs in [first_epoch, last_epoch) (None: to the end), in epoch order,
    "epoch" left out unless `with_epoch`; the last row of an epoch written twice wins (a resumed run), a
    header written again is skipped, and "NA" or empty values (epochs not validated)
    are left out of their row. The one reader of history.csv."""
    path = os.path.join(workdir, "history.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    rows = {}
    header = None
    for line in lines:
        if not line:
            continue
        if line[0] == "epoch":
            header = line
            continue
        row = dict(zip(header, line))
        epoch = int(row["epoch"])
        if first_epoch <= epoch and (last_epoch is None or epoch < last_epoch):
            rows[epoch] = {k: float(v) for k, v in row.items()
                           if (with_epoch or k != "epoch")
                           and v not in ("", "NA")}  # NA: not validated
    return [rows[e] for e in sorted(rows)]
