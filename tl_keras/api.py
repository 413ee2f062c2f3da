"""One call from Python or a notebook: fine-tune, advise, evaluate, classify.

    tl_keras.finetune(dataset, regime=..., **config)   -> Run        (tools/finetune.py)
    tl_keras.advise_regime(dataset, **config)          -> AdviceRun  (tools/advise.py)
    tl_keras.evaluate_run(workdir, ...)                -> Evaluation (tools/evaluate.py)
    tl_keras.classify(workdir_or_export, images, ...)  -> Predictions (tools/predict.py)
    tl_keras.find_learning_rate(dataset, regime=...)   -> RangeTestRun (tools/lr_find.py)

Each runs exactly what its tool runs -- the tools are thin callers of these --
and returns a result that shows itself in a notebook (`_repr_html_`: the
metrics, the curves and the regime picture inline). Keyword arguments are
config keys (configs/base.py); a nested one takes a dict
(`advisor={"sample": 500}`). A bad setting is a `ValueError` of one line.

Example:
    import tl_keras
    run = tl_keras.finetune("fashion_mnist", regime="small_similar", max_examples=2000)
    run.metrics["val_accuracy"], run.workdir, run.model
"""

import dataclasses
import html
import importlib
import os
import time

import ml_collections

from tl_keras import advise, backbones, plan as plan_lib, prepare, run_folder, tables, tasks


# --- Configs -----------------------------------------------------------------------------

def make_config(regime="small_similar", config=None, folder="runs", prefix=None, **overrides):
    """The config a run of `regime` reads: `config` (a ConfigDict of your own) or
    configs/<regime>.py, with `overrides` (config keys) over it and, with no
    workdir set, a new `folder/<prefix or regime>_<backbone>_<time>`.

    Returns (config, given): `given` is the keys set over a regime's config file,
    or None when `config` was your own (`prepare.prepare` reads them).
    """
    prepare.check_regime(regime)
    if config is None:
        name = prepare.config_file_regime(regime)
        config = importlib.import_module(f"tl_keras.configs.{name}").get_config()
        given = set(overrides)
    elif isinstance(config, dict):  # keys over configs/base.py's defaults
        config, given = apply_overrides(plan_lib.with_defaults({}), config), None
    elif not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"config takes an ml_collections.ConfigDict or a dict of config keys, "
                         f"got {type(config).__name__}")
    else:
        given = None
    config = plan_lib.editable(config)
    config.regime = regime
    table = overrides.pop("dataset") if tables.is_dataframe(overrides.get("dataset")) else None
    apply_overrides(config, overrides)
    if table is not None:  # a DataFrame: saved as the CSV file the run's config names
        config.dataset = tables.saved_dataframe(table, config.table.path_column)
    return with_workdir(config, folder, prefix), given


def apply_overrides(config, overrides):
    """Sets each of `overrides` in `config`; an unknown key is a `ValueError`."""
    known = plan_lib.with_defaults(config)
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(f"unknown config key {key!r} (every key is in configs/base.py)")
        if isinstance(known[key], ml_collections.ConfigDict):
            if not isinstance(value, dict):
                raise ValueError(f"config key {key!r} takes a dict of its keys "
                                 f"({', '.join(known[key])}), got {value!r}")
            unknown = sorted(set(value) - set(known[key]))
            if unknown:
                raise ValueError(f"unknown config key '{key}.{unknown[0]}'; valid: "
                                 f"{', '.join(known[key])}")
            config[key] = known[key]
            config[key].update(value)
        else:
            try:
                config[key] = checked_value(key, known[key], value)
            except TypeError as e:  # ml_collections refuses another type
                raise ValueError(f"bad value for {key}: {e}") from None
    return config


def checked_value(key, default, value):
    """`value` for config key `key` (whose default is `default`), or a `TypeError`
    when it is of another kind: a bool for a number, a number for a
    switch, a word for a number. A path (`pathlib.Path`) is taken as its string."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if default is None or isinstance(default, str):  # str keys, and placeholders (cut)
        ok = value is None or isinstance(value, str)
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = True
    if not ok:
        kind = {bool: "True or False", int: "a whole number", float: "a number",
                str: "a string"}.get(type(default), "a string")
        raise TypeError(f"takes {kind}, got {value!r}")
    return value


def with_workdir(config, folder, prefix=None):
    """`config` with a new `folder/<prefix or regime>_<backbone>_<time>` when its workdir
    is unset."""
    if not config.get("workdir"):
        config.workdir = os.path.join(
            folder, f"{prefix or config.regime}_{backbones.slug(config.backbone)}_"
                    f"{time.strftime('%Y%m%d-%H%M%S')}")
    return config


def refuse_nonempty(workdir):
    """A `ValueError` when `workdir` holds anything: the tools that write one result
    folder (advice, range test) overwrite nothing."""
    if os.path.isdir(workdir) and os.listdir(workdir):
        raise ValueError(f"workdir {workdir!r} is not empty; choose another --workdir")


# --- Fine-tune ---------------------------------------------------------------------------

class PeerFailure(RuntimeError):
    """A multi-worker run's peer died: the process must rejoin the cluster afresh
    (`distribute.restart`, which tools/finetune.py calls)."""


def finetune(dataset=None, regime="small_similar", *, config=None, export_dir=None,
             export_format="saved_model", export_quantize="int8", **overrides):
    """Fine-tunes in `regime` on `dataset` and writes the run folder, as tools/finetune.py.

    Args:
      dataset: a folder of class subfolders, a .csv or .tsv label table, a pandas
        DataFrame of image paths and labels (docs/data.md), `tfds:NAME`, `fashion_mnist` or
        `digits` (None: the config's).
      regime: small_similar | small_different | large_similar | large_different |
        auto (the regime advisor measures, then its regime runs).
      config: a ConfigDict of your own instead of configs/<regime>.py.
      export_dir: also export the final model there as its next version
        (`export_format` "saved_model" for TF Serving, or "litert" quantized
        by `export_quantize`).
      **overrides: config keys, e.g. `epochs=5, max_examples=2000`.

    Returns:
      `Run`.

    Example:
        run = tl_keras.finetune("path/to/images", regime="auto")
    """
    if dataset is not None:
        overrides["dataset"] = dataset
    check_export(export_format, export_quantize)
    config, given = make_config(regime, config, **overrides)
    return finetune_config(config, given, export_dir, export_format, export_quantize)


EXPORT_FORMATS = ("saved_model", "litert")


def check_export(export_format, export_quantize):
    """A one-line `ValueError` for an export that cannot be made, before training."""
    from tl_keras import litert

    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export_format {export_format!r}; valid: "
                         f"{', '.join(EXPORT_FORMATS)}")
    if export_quantize not in litert.QUANTIZE:
        raise ValueError(f"unknown export_quantize {export_quantize!r}; valid: "
                         f"{', '.join(litert.QUANTIZE)}")


def finetune_config(config, given=None, export_dir=None, export_format="saved_model",
                    export_quantize="int8"):
    """`finetune` of a config made already (`make_config`; tools/finetune.py's flags)."""
    from tl_keras import distribute, export, train

    def check_folder(plan, strategy):  # a finished run, another run's folder: refused now
        if distribute.writes(strategy):
            run_folder.check(plan.config.workdir, plan.to_dict())

    strategy = None  # known from before_data on: a peer lost in the advisor's pilots too

    def before_data(plan, made):
        nonlocal strategy
        strategy = made
        if distribute.writes(strategy):
            run_folder.refuse_finished(plan.config.workdir)
        if export_dir:  # checked before training, not after
            export.check_export_dir(export_dir)
        print(f"Run folder: {plan.config.workdir}")

    try:
        ready = prepare.prepare(config, given, on_plan=check_folder, before_data=before_data)
        metrics = train.finetune(ready.plan, ready.datasets, strategy=strategy,
                                 first_view=ready.first_view)
    except Exception as e:
        if distribute.uses_loop(strategy) and distribute.is_peer_failure(e):
            raise PeerFailure(str(e)) from e
        raise
    workdir = ready.plan.config.workdir
    run = Run(workdir=workdir, metrics=metrics, advice=ready.advice, plan=ready.plan,
              chief=distribute.writes(strategy))
    if export_dir and run.chief:
        run.export = _export(workdir, export_dir, export_format, export_quantize)
    return run


def _export(workdir, export_dir, export_format, quantize):
    from tl_keras import export, litert

    try:
        if export_format == "litert":
            return litert.export_run(workdir, export_dir, quantize)
        return export.export_run(workdir, export_dir)
    except ValueError as e:
        raise ValueError(f"{str(e).strip().splitlines()[0]} (the run is complete in "
                         f"{workdir}; export it later with tools/export.py)") from None


@dataclasses.dataclass
class Run:
    """A finished run: its folder, metrics.json, the advice (regime=auto) and plan."""

    workdir: str
    metrics: dict
    advice: object = None  # advise.Advice, with regime=auto
    plan: object = None    # plan.Plan the run followed
    chief: bool = True     # False: another worker of a multi-worker run (the chief wrote)
    export: object = None  # what the export wrote, with export_dir
    _model: object = dataclasses.field(default=None, repr=False)

    @property
    def model(self):
        """The final model (model.keras), loaded on first use."""
        if self._model is None:
            import tl_keras.losses  # noqa: F401  (registers the smoothed loss model.keras may use)
            from tl_keras import model as model_lib

            self._model = model_lib.load_model(os.path.join(self.workdir, "model.keras"),
                                               compile=True)
        return self._model

    @property
    def monitor(self):
        """The metric the run is judged on: its task's (val_accuracy, val_mAP)."""
        return tasks.of_run(self.metrics).monitor

    @property
    def val_accuracy(self):
        return self.metrics["val_accuracy"]

    def __repr__(self):
        return (f"Run(workdir={self.workdir!r}, regime={self.metrics['regime']!r}, "
                f"{self.monitor}={self.metrics[self.monitor]:.4f})")

    def _repr_html_(self):
        from tl_keras import report

        return report.summary_html(self.workdir, self.metrics)


# --- Advise, evaluate, classify ----------------------------------------------------------

@dataclasses.dataclass
class AdviceRun:
    """What the advisor measured and decided, and where it wrote advice.json / advice.png."""

    advice: object  # advise.Advice
    paths: tuple
    workdir: str

    def __repr__(self):
        return (f"AdviceRun(regime={self.advice.regime!r}, cut={self.advice.cut!r}, "
                f"init={self.advice.init!r})")

    def _repr_html_(self):
        from tl_keras import report

        return (f"<p>{html.escape(self.advice.reasons)}.</p>"
                f"<pre>{html.escape(advise.format_table(self.advice))}</pre>"
                + report.image_tag(self.paths[1], "LogME per cut"))


def advise_regime(dataset=None, *, cuts=None, config=None, **overrides):
    """Which regime fits `dataset`? The advisor's measurement alone, as tools/advise.py:
    writes advice.json and advice.png to the workdir (default runs/advice_<backbone>_<time>).

    Example:
        tl_keras.advise_regime("digits").advice.regime
    """
    if dataset is not None:
        overrides["dataset"] = dataset
    if isinstance(cuts, str):  # "early,late" as the tool's --cuts takes it
        cuts = [c.strip() for c in cuts.split(",") if c.strip()]
    config, _ = make_config(prepare.AUTO, config, prefix="advice", **overrides)
    return advise_config(config, cuts)


def advise_config(config, cuts=None):
    """`advise_regime` of a config made already (tools/advise.py's flags). With
    `backbone="a,b,c"` each backbone is advised on and the best one's advice written."""
    folder = []

    def before_data(plan, strategy):
        folder.append(plan.config.workdir)  # normalised by the plan
        refuse_nonempty(folder[0])

    ready = prepare.prepare(config, before_data=before_data, cuts=cuts, decide=False)
    workdir = folder[0]
    return AdviceRun(ready.advice, tuple(advise.write(ready.advice, workdir)), workdir)


@dataclasses.dataclass
class RangeTestRun:
    """`find_learning_rate`'s result: the `lr_find.RangeTest`, where its files went."""

    test: object
    key: str        # the config key that sets the tested phase's rate
    paths: tuple    # lr_find.json, lr_find.png
    workdir: str

    def __repr__(self):
        return (f"RangeTestRun(phase={self.test.phase!r}, suggestion={self.test.suggestion:.2g}, "
                f"key={self.key!r}, workdir={self.workdir!r})")

    def _repr_html_(self):
        from tl_keras import report

        return (f"<p>Suggested {self.key}: {self.test.suggestion:.2g}</p>"
                + report.image_tag(self.paths[1], "loss against learning rate"))


def find_learning_rate(dataset=None, regime="large_similar", *, phase=None, steps=100,
                       min_rate=1e-7, max_rate=1.0, config=None, **overrides):
    """The learning-rate range test of one phase of `regime` (default: its last), as
    tools/lr_find.py: writes lr_find.json and lr_find.png to the workdir (default
    runs/lr_find_<backbone>_<time>) and suggests a rate. Nothing is trained for keeps.

    Example:
        tl_keras.find_learning_rate("digits", regime="large_similar").test.suggestion
    """
    if dataset is not None:
        overrides["dataset"] = dataset
    config, _ = make_config(regime, config, prefix="lr_find", **overrides)
    return find_learning_rate_config(config, phase, steps, min_rate, max_rate)


def find_learning_rate_config(config, phase=None, steps=100, min_rate=1e-7, max_rate=1.0):
    """`find_learning_rate` of a config made already (tools/lr_find.py's flags)."""
    from tl_keras import features, lr_find, train

    if config.regime == prepare.AUTO:
        raise ValueError("the range test needs a regime; --regime=auto decides one while "
                         "training (run tools/advise.py first)")
    lr_find.check_range(steps, min_rate, max_rate)  # before the data is read
    plan = plan_lib.resolve(config)
    names = [p.name for p in plan.phases]
    if phase is None:
        phase = names[-1]
    if phase not in names:
        raise ValueError(f"regime {config.regime!r} has no phase {phase!r}; its phases: "
                         f"{', '.join(names)}")
    workdir = plan.config.workdir
    refuse_nonempty(workdir)
    datasets = prepare.load_data(plan)
    with train.dtype_policy(plan):
        model, _ = train.build(plan, len(datasets.class_names), datasets.channels)
        if plan.config.init == "pretrained":  # as a run's first phase starts
            features.adapt_feature_norm(model, features.sample(model, datasets))
        chosen = plan.phases[names.index(phase)]
        print(f"Range test of phase {phase!r}: up to {steps} batches at rates "
              f"{min_rate:g} to {max_rate:g}")
        test = lr_find.range_test(model, chosen, datasets.train, plan.loss, steps=steps,
                                  min_rate=min_rate, max_rate=max_rate)
    key = lr_find.rate_key(chosen)
    os.makedirs(workdir, exist_ok=True)
    paths = (os.path.join(workdir, "lr_find.json"), os.path.join(workdir, "lr_find.png"))
    run_folder.write_json(paths[0], {**test.to_dict(), "key": key})
    lr_find.draw(test, paths[1])
    print(f"Suggested {key}: {test.suggestion:.2g} (a tenth of the rate at the lowest loss; "
          f"the loss fell fastest at {test.steepest:.2g})")
    return RangeTestRun(test, key, paths, workdir)


@dataclasses.dataclass
class Evaluation:
    """tools/evaluate.py's result: eval.json's numbers, the pictures in RUN/eval/."""

    workdir: str
    result: dict

    def __repr__(self):
        return f"Evaluation(workdir={self.workdir!r}, accuracy={self.result['accuracy']:.4f})"

    def _repr_html_(self):
        from tl_keras import evaluate, report

        folder = os.path.join(self.workdir, "eval")
        return (f"<pre>{html.escape(evaluate.format_summary(self.result))}</pre>"
                + "".join(report.image_tag(os.path.join(folder, f), f)
                          for f in ("confusion.png", "reliability.png")
                          if os.path.exists(os.path.join(folder, f))))


def evaluate_run(workdir, dataset=None, tta="none", top_k=5, which="model"):
    """Per-class scores, confusion, calibration and the worst mistakes of a finished run,
    as tools/evaluate.py: writes RUN/eval/ and report.html again.

    Example:
        tl_keras.evaluate_run(run.workdir, tta="flip").result["accuracy"]
    """
    from tl_keras import evaluate

    result = evaluate.evaluate_run(workdir, dataset=dataset, tta=tta, top_k=top_k,
                                   which=which, verbose=int(plan_lib.interactive()))
    return Evaluation(workdir, result)


@dataclasses.dataclass
class Predictions:
    """tools/predict.py's rows: [path, class_1, probability_1, ..., class_k, probability_k]
    per decodable image, most probable first; `skipped`: [(path, reason)]."""

    rows: list
    skipped: list
    source: str
    top_k: int

    def to_csv(self, stream):
        from tl_keras import predict

        predict.write_csv(self.rows, self.top_k, stream)

    def __repr__(self):
        return f"Predictions({len(self.rows)} images, {len(self.skipped)} skipped, {self.source})"

    def _repr_html_(self):
        from tl_keras import report

        return report.table([(row[0], ", ".join(f"{c} {p:.3f}" for c, p in
                                                zip(row[1::2], row[2::2])))
                             for row in self.rows], ["image", "top classes"])


def classify(model, images, top_k=5, strict=False, which="model", saved_model=None):
    """Classifies image files and folders with a finished run (`model`: its workdir;
    `which` model.keras or best.keras) or an export of tools/export.py (a SavedModel
    folder: its highest version, or a version folder), as tools/predict.py.
    `saved_model`: which `model` is (None: a run folder when it holds metrics.json).

    Example:
        tl_keras.classify(run.workdir, ["photo.jpg", "more/"], top_k=3).rows
    """
    from tl_keras import predict

    if isinstance(images, (str, os.PathLike)):
        images = [images]
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    model = os.fspath(model)
    if saved_model is None:
        saved_model = not os.path.exists(os.path.join(model, "metrics.json"))
    predictor = predict.from_saved_model(model) if saved_model else predict.from_run(model, which)
    rows, skipped = predict.predict_files(predictor, [os.fspath(i) for i in images],
                                          top_k, strict)
    return Predictions(rows, skipped, predictor.source, top_k)
