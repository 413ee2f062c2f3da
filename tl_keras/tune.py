"""Keras Tuner sweeps over a regime's own choices, each trial trained as `finetune` trains it.

    search_space(hp, plan)      the regime's hyperparameters: cut, dropout, learning
                                rates, label smoothing; the large regimes add phase 2's
    TransferHyperModel.build    `train.build` with the trial's values
    TransferHyperModel.fit      `train.finetune`: the regime's phases, into the trial's
                                run folder, on backbone features cached once per cut
                                and shared by every trial that cuts there
    write_results               tuning.csv (best first) and best_config.py

Keras Tuner clears the Keras session before it builds each trial's model
(`Tuner._try_build`); the cached features are numpy arrays and outlive it.

The sweep folder (`workdir`):

    sweep.json        the sweep's settings; a re-run must match them to resume
    tuner/            Keras Tuner's state: the oracle and its trials (what resumes)
    trials/<id>/      each trial's run folder (config.json, history.csv, metrics.json;
                      no model files, the winner is retrained from best_config.py)
    features/         cached features too big for memory, shared by trials
    tuning.csv        one row per trial, best first
    best_config.py    the best trial's config, for `tools/finetune.py --config=`

Distributed tuning is Keras Tuner's own: with KERASTUNER_TUNER_ID,
KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT set, the chief serves the
oracle and workers run trials (docs/tuning.md).

Example:
    plan = tl_keras.plan.resolve(config)
    tuner = make_tuner("random", plan, data, max_trials=10, workdir="sweeps/a")
    tuner.search()
    rows = write_results(tuner, plan, "sweeps/a")
"""

import contextlib
import csv
import json
import os
import pprint

import keras
import keras_tuner as kt

from tl_keras import backbones, features, keras_internals, plan as plan_lib, run_folder, train
from tl_keras import trainable


def objective(plan):
    """What trials are ranked by: the task's validation metric (`val_accuracy`), maximised."""
    return plan.task.monitor


# --- Search space -------------------------------------------------------------------

def search_space(hp, plan):
    """Declares `plan`'s regime's hyperparameters on `hp`; returns their names.

    Every name is a config key (configs/base.py), so a trial's values are a
    config. Defaults are the plan's own values.
    """
    config = plan.config
    regime = trainable.get_regime(config.regime)
    cuts = list(regime.cuts or backbones.CUT_POINTS)
    cut = config.cut if config.cut in cuts else regime.cut
    hp.Choice("cut", cuts, default=cut)
    hp.Float("dropout", 0.0, 0.5, step=0.1, default=_clip(config.dropout, 0.0, 0.5))
    hp.Float("learning_rate", 1e-4, 1e-2, sampling="log",
             default=_clip(config.learning_rate, 1e-4, 1e-2))
    smoothing = [0.0, 0.1, 0.2]
    hp.Choice("label_smoothing", smoothing,
              default=config.label_smoothing if config.label_smoothing in smoothing else 0.0)
    if any(p.name == "finetune" for p in plan.phases) and config.epochs > 1:
        hp.Int("head_epochs", 1, config.epochs - 1,
               default=int(_clip(config.head_epochs, 1, config.epochs - 1)))
        # Around the recipe's default peak (3e-4 under a cosine schedule, docs/quality.md).
        hp.Float("finetune_learning_rate", 1e-5, 1e-3, sampling="log",
                 default=_clip(config.finetune_learning_rate, 1e-5, 1e-3))
        # How deep phase 2 unfreezes: the top 1, 2 or 3 stages, or all (0).
        hp.Choice("unfreeze", [1, 2, 3, 0], default=0)
    return list(hp.values)


def _clip(value, low, high):
    return min(max(value, low), high)


def trial_config(config, values):
    """`config` with a trial's hyperparameter values.

    Keras Tuner's own entries (`tuner/...`) are left out, but for Hyperband's
    epoch budget `tuner/epochs`, which becomes `epochs`.
    """
    config = plan_lib.editable(config)
    for name, value in values.items():
        if name == "tuner/epochs":
            config.epochs = int(value)
        elif not name.startswith("tuner/"):
            config[name] = value
    return config


# --- HyperModel ---------------------------------------------------------------------

class TransferHyperModel(kt.HyperModel):
    """Builds and trains a trial with tl_keras's own `train.build` and `train.finetune`.

    Args:
      plan: the sweep's `plan.Plan`; each trial overrides its hyperparameters
        (`trial_config`) and is resolved into a plan of its own.
      data: `data.Datasets` (or numpy `(x, y)` tuples with the same fields).
      workdir: the sweep folder; trial `<id>` runs in `workdir/trials/<id>/`.
      strategy: a one-host `tf.distribute.Strategy` every trial is built and
        trained under (`data` batched at its global batch), or None.
    """

    def __init__(self, plan, data, workdir, strategy=None):
        super().__init__(name="tl_keras")
        self.plan, self.data, self.workdir = plan, data, workdir
        self.strategy = strategy
        self.feature_store = features.FeatureStore(os.path.join(workdir, "features"))
        self._plans = {}  # each trial's values resolved once, for build and fit

    def declare_hyperparameters(self, hp):
        search_space(hp, self.plan)

    def trial_plan(self, hp):
        """The plan of the trial whose values `hp` holds."""
        key = tuple(sorted(hp.values.items()))
        if key not in self._plans:
            self._plans[key] = plan_lib.resolve(trial_config(self.plan.config, hp.values))
        return self._plans[key]

    def build(self, hp):
        search_space(hp, self.plan)  # Keras Tuner may call build before declaring
        plan = self.trial_plan(hp)
        keras.utils.set_random_seed(plan.config.seed)  # as finetune does before building
        scope = self.strategy.scope() if self.strategy else contextlib.nullcontext()
        with train.dtype_policy(plan), scope:
            model, _ = train.build(plan, len(self.data.class_names), self.data.channels)
        return model

    def fit(self, hp, model, *args, trial_id, callbacks=(), initial_epoch=0, **kwargs):
        plan = self.trial_plan(hp).with_workdir(os.path.join(self.workdir, "trials", trial_id))
        # Hyperband continues its best trials from their weights. Keras
        # Tuner's checkpoint callback would see the head model alone when the
        # head trains on cached features, so the full model is saved here.
        save_best_epoch = keras_internals.save_best_epoch_class()
        checkpoints = [c.filepath for c in callbacks
                       if isinstance(c, save_best_epoch) and "tuner/epochs" in hp.values]
        done = os.path.join(plan.config.workdir, "metrics.json")
        if os.path.exists(done):  # finished just before an earlier attempt was interrupted
            with open(done) as f:
                metrics = json.load(f)
            if not all(os.path.exists(path) for path in checkpoints):
                raise RuntimeError(f"trial {trial_id} finished without its checkpoint")
            print(f"trial_id {trial_id} finished in an earlier attempt; its result is reused.")
        else:
            # Fresh pipelines: every trial reads the data in the order a new
            # finetune.py process does, so features one trial computes and another
            # reuses are those of that order, and the winner retrains to its result.
            data = self.data.fresh() if getattr(self.data, "fresh", None) else self.data
            metrics = train.finetune(plan, data, model=model, initial_epoch=initial_epoch,
                                     feature_store=self.feature_store, save_models=False,
                                     strategy=self.strategy)
            for path in checkpoints:
                run_folder.write_atomically(path, model.save_weights)
        rss, peak = memory_mb()
        name = objective(self.plan)
        print(f"trial_id {trial_id} done{' on ' + tuner_id() if role() != 'single' else ''}: "
              f"{name} {metrics[name]:.4f}, "
              f"{metrics['wall_seconds']:.1f} s, RSS {rss:.0f} MB (peak {peak:.0f} MB)",
              flush=True)
        return {name: metrics[name], "seconds": metrics["wall_seconds"],
                "rss_mb": rss, "peak_rss_mb": peak}


def memory_mb():
    """(resident set size now, its peak so far) of this process, in MB (Linux)."""
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return tuple(int(status[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))


# --- Distributed tuning (Keras Tuner's chief / worker mode) --------------------------

def tuner_id():
    return os.environ.get("KERASTUNER_TUNER_ID", "this process")


def role():
    """"single", "chief" or "worker", from the KERASTUNER_* environment variables."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "single"
    missing = [v for v in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID") if v not in os.environ]
    if missing:
        raise ValueError(f"KERASTUNER_ORACLE_IP is set but {' and '.join(missing)} not; "
                         "distributed tuning needs all three")
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


def oracle_address():
    return f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"


def check_oracle_port():
    """Chief: raises `ValueError` when the oracle's address cannot be served."""
    import socket

    host, port = os.environ["KERASTUNER_ORACLE_IP"], os.environ["KERASTUNER_ORACLE_PORT"]
    try:
        with socket.create_server((host, int(port))):
            pass
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot serve the oracle at {host}:{port}: "
                         f"{getattr(e, 'strerror', None) or e}") from None


def wait_for_oracle(timeout):
    """Worker: waits up to `timeout` seconds for the chief's oracle, else `ValueError`.

    Keras Tuner's own client waits an hour (keras-tuner#990) before it gives up.
    """
    import grpc

    address = oracle_address()
    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        raise ValueError(
            f"no Keras Tuner oracle answers at {address} after {timeout:g} s; start the "
            "chief first (KERASTUNER_TUNER_ID=chief) or fix KERASTUNER_ORACLE_IP/PORT") from None
    finally:
        channel.close()


# --- Tuners -------------------------------------------------------------------------

class _PassTrialId:
    """Hands the trial id to `HyperModel.fit`, which names the trial's run folder by it."""

    def run_trial(self, trial, *args, **kwargs):
        return super().run_trial(trial, *args, trial_id=trial.trial_id, **kwargs)


class RandomSearch(_PassTrialId, kt.RandomSearch):
    pass


class BayesianOptimization(_PassTrialId, kt.BayesianOptimization):
    pass


class Hyperband(_PassTrialId, kt.Hyperband):
    pass


TUNERS = {"random": RandomSearch, "hyperband": Hyperband, "bayesian": BayesianOptimization}


def check_sweep(name, plan, max_trials, workdir):
    """Raises `ValueError` for a bad tuner or `max_trials`, or a workdir that
    holds another sweep (run_folder.py); writes `workdir/sweep.json` otherwise."""
    if name not in TUNERS:
        raise ValueError(f"unknown tuner {name!r}; valid tuners: {', '.join(TUNERS)}")
    if max_trials < 1:
        raise ValueError(f"max_trials must be at least 1, got {max_trials}")
    plan_lib.refuse_unused_recipe(plan)
    run_folder.prepare(workdir, {"tuner": name, "config": plan.to_dict()},
                       name="sweep.json", kind="sweep")


def make_tuner(name, plan, data, max_trials, workdir, strategy=None):
    """A Keras Tuner `name` over `plan`'s regime, resuming the sweep in `workdir`.

    Args:
      name: random | hyperband | bayesian.
      plan: the sweep's `plan.Plan`; its `epochs` is Hyperband's `max_epochs`.
      data: the datasets every trial trains on.
      max_trials: trials in all, those of an earlier attempt included;
        Hyperband also ends when its brackets do.
      workdir: the sweep folder.
      strategy: the one-host strategy trials run under (TransferHyperModel).
    """
    check_sweep(name, plan, max_trials, workdir)
    config = plan.config
    common = dict(hypermodel=TransferHyperModel(plan, data, workdir, strategy),
                  objective=kt.Objective(objective(plan), "max"), seed=config.seed,
                  directory=workdir, project_name="tuner", overwrite=False)
    if name == "hyperband":
        tuner = Hyperband(max_epochs=config.epochs, **common)
        tuner.oracle.max_trials = max_trials  # Hyperband has no max_trials of its own
    else:
        tuner = TUNERS[name](max_trials=max_trials, **common)
    return tuner


# --- Results ------------------------------------------------------------------------

def results(tuner):
    """One dict per trial the oracle knows, completed ones best first."""
    space = [hp.name for hp in tuner.oracle.get_space().space]
    name = tuner.oracle.objective.name
    rows = []
    for trial in tuner.oracle.trials.values():
        metrics = trial.metrics
        value = {key: metrics.get_last_value(key) if metrics.exists(key) else None
                 for key in (name, "seconds", "peak_rss_mb")}
        row = {"trial_id": trial.trial_id, "status": trial.status, **value}
        values = trial.hyperparameters.values
        row.update({name: values.get(name) for name in space})
        if "tuner/epochs" in values:
            row["epochs"] = values["tuner/epochs"]
        if trial.status != "COMPLETED" and trial.message:  # Keras Tuner keeps the traceback
            row["error"] = [line for line in trial.message.splitlines() if line.strip()][-1]
        rows.append(row)
    rows.sort(key=lambda r: (r[name] is None, -(r[name] or 0), r["trial_id"]))
    return rows


def write_results(tuner, plan, workdir):
    """Writes tuning.csv and best_config.py; returns the rows of `results`."""
    rows = results(tuner)
    path = os.path.join(workdir, "tuning.csv")
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, _columns(rows))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path + ".tmp", path)
    best = [r for r in rows if r[objective(plan)] is not None]
    if best:
        trial = tuner.oracle.trials[best[0]["trial_id"]]
        write_best_config(os.path.join(workdir, "best_config.py"),
                          trial_config(plan.config, trial.hyperparameters.values), best[0],
                          workdir, objective(plan))
    return rows


def _columns(rows):
    """Every key of `rows`, in order of first appearance (a failed trial adds "error")."""
    columns = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    return columns


def write_best_config(path, config, row, workdir, metric="val_accuracy"):
    """`config` as a config file that `tools/finetune.py --config=PATH` reads; `row`, the
    trial's, holds its `metric`."""
    config = plan_lib.editable(config)
    config.workdir = ""  # a new run folder for the retrained model
    config.verbose = "auto"
    values = pprint.pformat(plan_lib.to_dict(config), indent=4, sort_dicts=True)
    text = f'''"""The best trial of the sweep in {workdir}: trial_id {row["trial_id"]}, {metric} {row[metric]:.4f}.

Retrain it, and export the model for TF Serving, with:
    python tools/finetune.py --config={path} --export_dir=exports/best
"""

import ml_collections


def get_config():
    return ml_collections.ConfigDict(
{values})
'''
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def format_table(rows, limit=20):
    """The best `limit` rows as an aligned text table."""
    if not rows:
        return "no trials"

    def show(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    columns = [c for c in _columns(rows) if c != "error"]  # errors go below the table
    cells = [columns] + [[show(r.get(c)) for c in columns] for r in rows[:limit]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells]
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more in tuning.csv")
    lines += [f"trial_id {r['trial_id']} {r['status']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines)
