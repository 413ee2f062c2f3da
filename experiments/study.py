"""Does the rule hold? Every strategy in every quadrant of the regime table, measured.

The regime table says what to keep, freeze and retrain from two things:
dataset size and similarity to the pretraining data. Here that is tested on
the table's own example network (`seed_cnn`: three conv and three fully
connected layers), pretrained here, as Yosinski et al. 2014 ("How
transferable are features in deep neural networks?") did on two halves of
ImageNet:

    pretrain   seed_cnn on Fashion-MNIST classes 0-4 (the source task), from
               scratch, as a tl_keras run; its backbone weights are the
               `.weights.h5` every transfer below starts from
    targets    similar:   Fashion-MNIST classes 5-9 (disjoint classes, same domain)
               different: printed characters (0-4, A-E) rendered with the
                          DejaVu fonts under random rotation, shift and noise
               digits:    scikit-learn's 8x8 digits (small only): a real one
    sizes      small: 100 training images per class (drawn by seed);
               large: every training image. Validation: the full held-out set.
    strategies frozen@CUT     keep the layers up to CUT, freeze them, train a new head
                              (R1 = frozen@fc2, the table's small/similar;
                               R2 = frozen@conv1, its small/different: tl_keras'
                               `small_different` cuts `early`, which is conv1)
               finetuned@CUT  the same, then fine-tune everything kept
                              (R3 = finetuned@fc2, the table's large regimes)
               scratch        every weight random, trained (R4)
    seeds      each cell 3 times; mean and standard deviation everywhere

Every cell is a `train.finetune` run of the regime that strategy is (frozen:
small_similar with a cut; finetuned: large_similar; scratch: large_different
with init=scratch), so the study tests tl_keras' own regimes, unchanged. Each
keeps a run folder under the work folder; a killed study resumes without
redoing a finished cell. Final validation accuracy is reported (no selection
on the validation set).

A second part asks the same of a real pretrained network: EfficientNet-Lite0
with its ImageNet weights, frozen, a new head at early / middle / late / top,
on Fashion-MNIST, digits and scikit-image's faces / non-faces photos.

A third part (`advisor_check`, `tools/study.py --advisor`) judges the regime
advisor (advise.py) against these results: in each quadrant, is the advised
strategy the measured best or within noise of it?

Example:
    results = run(QUICK, out_dir="benchmarks/study_quick", work_dir="/tmp/study")
"""

import contextlib
import dataclasses
import glob
import io
import json
import os
import time

import numpy as np

IMAGE_SIZE = 28  # Fashion-MNIST's own size: nothing is resized but the 8x8 digits
CUTS = ("conv1", "conv2", "conv3", "fc1", "fc2")
CHARACTERS = tuple("01234ABCDE")
FONT_DIR = "/usr/share/fonts/truetype/dejavu"  # Debian package fonts-dejavu-core
PRESCRIBED = {  # the table's prescription per quadrant
    ("small", "similar"): ("R1",),
    ("small", "different"): ("R2",),
    ("large", "similar"): ("R3",),
    ("large", "different"): ("R3", "R4"),  # "as large/similar, or from scratch"
}
STRATEGIES = {"R1": ("frozen", "fc2"), "R2": ("frozen", "conv1"), "R3": ("finetuned", "fc2"),
              "R4": ("scratch", "")}
LITE_CUTS = ("early", "middle", "late", "top")


PINNED_RECIPE = (("schedule", "constant"), ("warmup", 0.0), ("clipnorm", 0.0),
                 ("layer_decay", 1.0))
RECIPE_DEFAULTS = ()


@dataclasses.dataclass(frozen=True)
class Settings:
    seeds: tuple = (0, 1, 2)
    cuts: tuple = CUTS               # the depth curves' cuts (R1-R4 need conv1 and fc2)
    digits_cuts: tuple = ("conv1", "fc2")  # digits, the small real check: R1-R4 only
    targets: tuple = ("similar", "different", "digits")
    pretrain_max: int = 0            # cap on the source's training images (0: all 30,000)
    per_class_small: int = 100       # small: training images per class
    large_max: int = 0               # large: cap on training images (0: all)
    val_max: int = 0                 # cap on validation images (0: the full held-out set)
    characters_train: int = 30_000
    characters_val: int = 5_000
    pretrain_epochs: int = 3
    epochs: tuple = (("small", 20), ("large", 2))       # per size, across phases
    head_epochs: tuple = (("small", 8), ("large", 1))   # finetuned: head alone first
    batch_size: tuple = (("small", 32), ("large", 256))
    head_learning_rate: float = 1e-2  # a new head on frozen features (frozen, finetuned)
    learning_rate: float = 1e-3      # scratch and pretraining
    finetune_learning_rate: float = 3e-4  # finetuned, phase 2: everything
    # Recipe keys over configs/base.py's for the phases that train the backbone. Pinned to
    # what the committed results (benchmarks/study) were measured with: a constant AdamW
    # rate. RECIPE_DEFAULTS (tools/study.py --recipe=defaults): configs/base.py's recipe,
    # measured in benchmarks/study_recipe (docs/study.md).
    recipe: tuple = PINNED_RECIPE
    # Pretraining the source network keeps the constant rate in both.
    pretrain_recipe: tuple = PINNED_RECIPE
    lite_train: int = 1000           # EfficientNet-Lite0 part: training images per dataset
    lite_val: int = 1000
    lite_image_size: int = 96
    lite_epochs: int = 20

    def per_size(self, name, size):
        return dict(getattr(self, name))[size]


FULL = Settings()
# R1-R4 in the four quadrants only, on fewer images: about 2 minutes.
QUICK = Settings(seeds=(0,), cuts=("conv1", "fc2"), targets=("similar", "different"),
                 pretrain_max=4000, per_class_small=50, large_max=2000, val_max=1000,
                 characters_train=2000, characters_val=1000, pretrain_epochs=2,
                 epochs=(("small", 10), ("large", 4)), head_epochs=(("small", 4), ("large", 2)),
                 lite_train=200, lite_val=200, lite_epochs=5)


# --- Data ---------------------------------------------------------------------------

@dataclasses.dataclass
class Target:
    """Arrays of one task: grey uint8 images [N, H, W] and labels from 0."""
    x: np.ndarray
    y: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    class_names: list


def fashion_halves():
    """(source, similar): Fashion-MNIST classes 0-4 and 5-9, each a `Target`."""
    from tl_keras import arrays

    x, y, x_val, y_val, names = arrays.load_builtin("fashion_mnist")

    def half(first):
        train, val = (y >= first) & (y < first + 5), (y_val >= first) & (y_val < first + 5)
        return Target(x[train], (y[train] - first).astype("int32"), x_val[val],
                      (y_val[val] - first).astype("int32"), names[first:first + 5])

    return half(0), half(5)


def printed_characters(n, seed, size=IMAGE_SIZE):
    """`n` grey images of the characters in `CHARACTERS`, balanced, and their labels.

    Each is drawn in one of the DejaVu fonts at a random size, rotated by up
    to 15 degrees, shifted by up to 3 px, at a random contrast over a random
    background, with Gaussian noise. Reproducible by `seed`.
    """
    from PIL import Image, ImageDraw, ImageFont

    fonts = sorted(glob.glob(os.path.join(FONT_DIR, "*.ttf")))
    if not fonts:
        raise ValueError(f"no fonts in {FONT_DIR}: apt-get install fonts-dejavu-core")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(CHARACTERS)).astype("int32")
    faces = {}
    images = np.empty((n, size, size), "uint8")
    for i, label in enumerate(labels):
        key = (int(rng.integers(len(fonts))), int(rng.integers(size // 2, size * 3 // 4)))
        if key not in faces:
            faces[key] = ImageFont.truetype(fonts[key[0]], key[1])
        canvas = Image.new("L", (size, size), 0)
        ImageDraw.Draw(canvas).text((size / 2, size / 2), CHARACTERS[label], fill=255,
                                    font=faces[key], anchor="mm")
        canvas = canvas.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR,
                               translate=tuple(rng.uniform(-3, 3, 2)))
        image = (np.asarray(canvas, "float32") * rng.uniform(0.5, 1.0) + rng.uniform(0, 60)
                 + rng.normal(0, 12, (size, size)))
        images[i] = np.clip(np.round(image), 0, 255)
    return images, labels


def characters(settings):
    x, y = printed_characters(settings.characters_train, seed=1)
    x_val, y_val = printed_characters(settings.characters_val, seed=2)
    return Target(x, y, x_val, y_val, list(CHARACTERS))


def sklearn_digits():
    """scikit-learn's digits, 30% held out (seed 0): a small real "different" target."""
    from tl_keras import arrays

    x, y, _, _, names = arrays.load_builtin("digits")
    train, val = arrays.split_indices(y, 0.3, seed=0)
    return Target(x[train], y[train].astype("int32"), x[val], y[val].astype("int32"), names)


def subset(target, size, seed, settings):
    """The training set of `size` ("small": per class, seeded; "large": all) and the
    validation set, as `data.Examples`."""
    from tl_keras import arrays, data

    if size == "small":
        train, _ = arrays.split_indices(target.y, 0, seed=seed,
                                        examples_per_class=settings.per_class_small)
    else:
        train, _ = arrays.split_indices(target.y, 0, seed=0,
                                        max_examples=settings.large_max or None)
    val = slice(settings.val_max or None)
    return data.from_arrays(target.x[train], target.y[train], class_names=target.class_names,
                            x_val=target.x_val[val], y_val=target.y_val[val])


# --- Cells --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Cell:
    target: str    # similar | different | digits
    size: str      # small | large
    strategy: str  # frozen | finetuned | scratch
    cut: str       # a seed_cnn cut; "" for scratch
    seed: int

    @property
    def name(self):
        at = f"@{self.cut}" if self.cut else ""
        return f"{self.target}-{self.size}-{self.strategy}{at}-seed{self.seed}"


def cells(settings):
    """Every cell, grouped so that each training set is built once."""
    out = []
    for target in settings.targets:
        for size in (("small",) if target == "digits" else ("small", "large")):
            cuts = settings.digits_cuts if target == "digits" else settings.cuts
            for seed in settings.seeds:
                out += [Cell(target, size, "frozen", cut, seed) for cut in cuts]
                out += [Cell(target, size, "finetuned", cut, seed) for cut in cuts]
                out.append(Cell(target, size, "scratch", "", seed))
    return out


def cell_config(cell, settings, weights, workdir):
    """The tl_keras config that runs `cell`: its strategy is a regime."""
    from tl_keras.configs import base

    config = base.get_config()
    config.backbone = "seed_cnn"
    config.image_size = IMAGE_SIZE
    config.weights = weights
    config.augment = False
    config.cached_views = 1
    config.verbose = "0"
    config.validation_freq = 1000  # the final val_accuracy only: fit validates no epoch
    config.seed = cell.seed
    config.workdir = workdir
    config.batch_size = settings.per_size("batch_size", cell.size)
    config.update(dict(settings.recipe))
    config.epochs = settings.per_size("epochs", cell.size)
    config.learning_rate = (settings.learning_rate if cell.strategy == "scratch"
                            else settings.head_learning_rate)
    config.pool_grid = 3 if cell.cut.startswith("conv") else 1  # as small_different
    if cell.strategy == "frozen":
        config.regime, config.cut = "small_similar", cell.cut
    elif cell.strategy == "finetuned":
        config.regime, config.cut = "large_similar", cell.cut
        config.head_epochs = settings.per_size("head_epochs", cell.size)
        config.finetune_learning_rate = settings.finetune_learning_rate
    else:
        config.regime, config.init = "large_different", "scratch"
    return config


def run_cell(config, make_data, store=None, save_models=False):
    """`train.finetune` of `config` on `make_data()`, quietly; a finished run
    folder's metrics are reused, and its data never built. Returns (metrics, reused)."""
    from tl_keras import run_folder, train

    done = os.path.join(config.workdir, "metrics.json")
    if os.path.exists(done):
        return run_folder.read_json(done), True
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = train.finetune(config, make_data(), feature_store=store,
                                 save_models=save_models)
    return metrics, False


# --- The study ----------------------------------------------------------------------

def pretrain(source, settings, work_dir, out_path):
    """seed_cnn trained from scratch on `source`; its backbone weights saved to `out_path`.

    A tl_keras run (`large_different`, init=scratch): the backbone cut at
    `top` is the whole network below the classifier, and a `.weights.h5` of it
    is what `--weights=PATH` loads into `seed_cnn`.
    """
    import keras

    from tl_keras import data, run_folder

    config = cell_config(Cell("source", "large", "scratch", "", 0), settings, "none",
                         os.path.join(work_dir, "pretrain"))
    config.epochs = settings.pretrain_epochs
    config.update(dict(settings.pretrain_recipe))

    def make_data():
        train_idx = slice(settings.pretrain_max or None)
        examples = data.from_arrays(source.x[train_idx], source.y[train_idx],
                                    class_names=source.class_names,
                                    x_val=source.x_val, y_val=source.y_val)
        return data.make_datasets(examples, config, IMAGE_SIZE)

    metrics, _ = run_cell(config, make_data, save_models=True)  # model.keras: the backbone
    model = keras.saving.load_model(os.path.join(config.workdir, "model.keras"), compile=False)
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    run_folder.write_atomically(out_path, model.get_layer("backbone").save_weights)
    return metrics


def run(settings=FULL, out_dir="benchmarks/study", work_dir="runs/study", lite=True,
        command=""):
    """Runs every cell (and the EfficientNet-Lite0 part), writes `out_dir`; returns the results."""
    import keras

    from tl_keras import data, features

    start = time.time()
    _require("matplotlib", *(["skimage"] if lite else []))  # now, not after half an hour
    os.makedirs(out_dir, exist_ok=True)
    source, similar = fashion_halves()
    weights = os.path.join(out_dir, "seed_cnn_fashion0-4.weights.h5")
    print(f"Pretraining seed_cnn on Fashion-MNIST classes 0-4 "
          f"({settings.pretrain_max or len(source.x)} images, "
          f"{settings.pretrain_epochs} epochs) ...", flush=True)
    pretrained = pretrain(source, settings, work_dir, weights)
    print(f"  source-task val_accuracy {pretrained['val_accuracy']:.3f}; weights: {weights}",
          flush=True)
    make = {"similar": lambda: similar, "different": lambda: characters(settings),
            "digits": sklearn_digits}
    targets = {name: make[name]() for name in settings.targets}

    todo = cells(settings)
    rows, examples, store, group = [], None, None, None
    for i, cell in enumerate(todo, 1):
        # A new training set: small ones are drawn by seed, a large one is the same
        # for every seed, and so are its features at each cut.
        training_set = (cell.target, cell.size, cell.seed if cell.size == "small" else None)
        if training_set != group:
            group = training_set
            examples = subset(targets[cell.target], cell.size, cell.seed, settings)
            store = features.FeatureStore()  # features of this training set only
        config = cell_config(cell, settings, weights, os.path.join(work_dir, cell.name))
        keras.backend.clear_session()
        tick = time.time()
        metrics, reused = run_cell(
            config, lambda: data.make_datasets(examples, config, IMAGE_SIZE), store)
        rows.append({**dataclasses.asdict(cell), "val_accuracy": metrics["val_accuracy"],
                     "train_examples": metrics["train_examples"],
                     "val_examples": metrics["val_examples"],
                     "seconds": metrics["wall_seconds"]})
        print(f"[{i}/{len(todo)}] {cell.name}: val_accuracy {metrics['val_accuracy']:.3f} "
              f"({'done earlier' if reused else f'{time.time() - tick:.1f} s'})", flush=True)
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": command,
        "settings": dataclasses.asdict(settings),
        "pretrain": {"source_val_accuracy": pretrained["val_accuracy"],
                     "train_examples": pretrained["train_examples"], "weights": weights},
        "cells": rows,
        "summary": summarize(rows),
    }
    if lite:
        results["lite"] = lite_depth(settings, work_dir)
    results["wall_seconds"] = round(time.time() - start, 1)
    write_outputs(results, out_dir)
    return results


def _require(*modules):
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"the study needs {', '.join(missing)}: pip install -e '.[study]'")


# --- The real pretrained network ----------------------------------------------------

def lite_targets(settings):
    """Fashion-MNIST, digits and faces / non-faces photos, each a `Target`."""
    from skimage import data as photos

    from tl_keras import arrays

    x, y, x_val, y_val, names = arrays.load_builtin("fashion_mnist")
    train, _ = arrays.split_indices(y, 0, seed=0, max_examples=settings.lite_train)
    val, _ = arrays.split_indices(y_val, 0, seed=0, max_examples=settings.lite_val)
    out = {"fashion_mnist": Target(x[train], y[train], x_val[val], y_val[val], names),
           "digits": sklearn_digits()}
    faces = photos.lfw_subset()  # 100 faces, then 100 non-faces, 25x25, 0-1
    labels = (np.arange(len(faces)) >= 100).astype("int32")
    train, val = arrays.split_indices(labels, 0.3, seed=0)
    pixels = np.round(faces * 255).astype("uint8")
    out["faces"] = Target(pixels[train], labels[train], pixels[val], labels[val],
                          ["face", "not a face"])
    return out


def lite_depth(settings, work_dir):
    """Frozen-head val_accuracy of EfficientNet-Lite0 (ImageNet) at each cut: mean, std."""
    import keras

    from tl_keras import data, features
    from tl_keras.configs import base

    out = {}
    for name, target in lite_targets(settings).items():
        examples = data.from_arrays(target.x, target.y, class_names=target.class_names,
                                    x_val=target.x_val, y_val=target.y_val)
        store = features.FeatureStore()
        for cut in LITE_CUTS:
            accuracies = []
            for seed in settings.seeds:
                config = base.get_config()
                config.regime, config.cut, config.seed = "small_similar", cut, seed
                config.image_size, config.epochs = settings.lite_image_size, settings.lite_epochs
                config.augment, config.cached_views, config.verbose = False, 1, "0"
                config.pool_grid = 1 if cut == "top" else 3
                config.workdir = os.path.join(work_dir, "lite", f"{name}-{cut}-seed{seed}")
                keras.backend.clear_session()
                metrics, _ = run_cell(config, lambda: data.make_datasets(
                    examples, config, config.image_size), store)
                accuracies.append(metrics["val_accuracy"])
            out.setdefault(name, {})[cut] = _stats(accuracies)
            print(f"EfficientNet-Lite0 frozen@{cut} on {name}: "
                  f"{_format(out[name][cut])}", flush=True)
    return out


# --- The advisor against the study --------------------------------------------------

SEED_CUT = {"early": "conv1", "middle": "conv2", "late": "conv3", "top": "fc2"}


def advised_strategy(advice, cut_names=SEED_CUT):
    """The study's name of what `advice` runs: "frozen@conv3", "finetuned@fc2", "scratch"."""
    if advice.init == "scratch":
        return "scratch"
    kind = "frozen" if advice.regime.startswith("small") else "finetuned"
    return f"{kind}@{cut_names.get(advice.cut, advice.cut)}"


def _advise_on(examples, config):
    from tl_keras import data, pilots as pilots_lib, plan as plan_lib

    plan = plan_lib.resolve(config)
    datasets = data.make_datasets(examples, plan.config, plan.image_size)
    advice, _ = pilots_lib.advise(plan, datasets, verbose=0,
                                  pilots=pilots_lib.PilotSettings.from_config(plan.config.advisor))
    return advice


def _verdict(depth, label):
    """(best label, gap in points, within noise) of `label` among `depth`'s strategies."""
    best = max(depth, key=lambda k: depth[k]["mean"])
    gap = depth[best]["mean"] - depth[label]["mean"]
    noise = 2 * max(depth[best]["std"], depth[label]["std"])
    return best, round(100 * gap, 1), bool(gap <= noise)


def advisor_check(settings=FULL, study_dir="benchmarks/study", work_dir="runs/study"):
    """The advisor's pick in every quadrant of the study and on the EfficientNet-Lite0
    sets, against the measured best; a strategy the study did not run is run now
    (3 seeds, as the study would). Writes `study_dir/advice.json` and `advice.md`."""
    import keras

    from tl_keras import data, run_folder

    with open(os.path.join(study_dir, "study.json")) as f:
        results = json.load(f)
    weights = os.path.join(study_dir, "seed_cnn_fashion0-4.weights.h5")
    _, similar = fashion_halves()
    make = {"similar": lambda: similar, "different": lambda: characters(settings),
            "digits": sklearn_digits}
    rows = []
    for key, quadrant in results["summary"].items():
        target_name, size = key.split("/")
        target = make[target_name]()
        config = cell_config(Cell(target_name, size, "frozen", "fc2", 0), settings, weights, "")
        config.learning_rate = settings.learning_rate  # one rate for the pilots: scratch's
        keras.backend.clear_session()
        advice = _advise_on(subset(target, size, 0, settings), config)
        label = advised_strategy(advice)
        depth, ran_now = dict(quadrant["depth"]), False
        if label not in depth:  # a strategy the study did not run here: run it now
            strategy, _, cut = label.partition("@")
            accuracies = []
            for seed in settings.seeds:
                cell = Cell(target_name, size, strategy, cut, seed)
                cell_conf = cell_config(cell, settings, weights, os.path.join(work_dir, cell.name))
                examples = subset(target, size, seed, settings)
                keras.backend.clear_session()
                metrics, _ = run_cell(cell_conf, lambda: data.make_datasets(
                    examples, cell_conf, IMAGE_SIZE))
                accuracies.append(metrics["val_accuracy"])
            depth[label], ran_now = _stats(accuracies), True
        best, gap, within = _verdict(depth, label)
        four = [c["seconds"] for c in results["cells"] if c["target"] == target_name
                and c["size"] == size and c["seed"] == 0
                and (c["strategy"], c["cut"]) in STRATEGIES.values()]
        rows.append({
            "network": "seed_cnn", "target": key, "train_examples": advice.train_examples,
            "advice": advice.to_dict(), "advised": label,
            "advised_accuracy": depth[label], "ran_now": ran_now,
            "best": best, "best_accuracy": depth[best], "gap_points": gap, "within_noise": within,
            "advisor_seconds": advice.seconds, "four_regimes_seconds": round(sum(four), 1)})
        print(f"{key}: advised {label} ({_format(depth[label])}); best {best} "
              f"({_format(depth[best])}): {'ok' if within else f'{gap} points behind'}",
              flush=True)
    for name, target in lite_targets(settings).items():
        from tl_keras.configs import base

        config = base.get_config()
        config.image_size, config.augment, config.workdir = settings.lite_image_size, False, ""
        examples = data.from_arrays(target.x, target.y, class_names=target.class_names,
                                    x_val=target.x_val, y_val=target.y_val)
        keras.backend.clear_session()
        advice = _advise_on(examples, config)
        depth = {f"frozen@{cut}": stats for cut, stats in results["lite"][name].items()}
        label = advised_strategy(advice, cut_names={})
        row = {"network": "efficientnet_lite0", "target": name,
               "train_examples": advice.train_examples, "advice": advice.to_dict(),
               "advised": label, "advisor_seconds": advice.seconds}
        if label in depth:
            best, gap, within = _verdict(depth, label)
            row.update(advised_accuracy=depth[label], best=best, best_accuracy=depth[best],
                       gap_points=gap, within_noise=within)
        rows.append(row)
        print(f"EfficientNet-Lite0 on {name}: advised {label}", flush=True)
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "study": results["date"], "rows": rows}
    run_folder.write_json(os.path.join(study_dir, "advice.json"), out)
    table = format_advice_table(rows)
    run_folder.write_text(os.path.join(study_dir, "advice.md"), table + "\n")
    print(table)
    return out


def _pilots(advice):
    """The pilots' held-out accuracies as the advice table shows them: the frozen one at
    the advised cut (advised from scratch: the best frozen one), then each trained one."""
    pilots = advice.get("pilots") or {}
    frozen = {n: p for n, p in pilots.items() if n.startswith("frozen@")}
    if not frozen:
        return "-"
    key = f"frozen@{advice['cut']}"
    if advice["init"] == "scratch" or key not in frozen:
        key = max(frozen, key=lambda n: frozen[n]["accuracy"])
    shown = {key: frozen[key], **{n: p for n, p in pilots.items() if n not in frozen}}
    return ", ".join(f"{n} {p['accuracy']:.3f}" for n, p in shown.items())


def format_advice_table(rows):
    lines = ["| network | target | advice | pilots (held-out accuracy) | advised strategy | "
             "its accuracy | measured best | verdict |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = r["advice"]
        advice = (f"`{a['regime']}` at `{a['cut']}`"
                  f"{', init=scratch' if a['init'] == 'scratch' else ''} | {_pilots(a)}")
        if "best" not in r:
            lines.append(f"| {r['network']} | {r['target']} | {advice} | {r['advised']} | "
                         "not measured | | |")
            continue
        verdict = ("best" if r["advised"] == r["best"] else
                   f"{r['gap_points']} points behind, "
                   f"{'within' if r['within_noise'] else 'outside'} noise")
        lines.append(f"| {r['network']} | {r['target']} | {advice} | {r['advised']} | "
                     f"{_format(r['advised_accuracy'])}{' (run now)' if r.get('ran_now') else ''}"
                     f" | {r['best']} {_format(r['best_accuracy'])} | {verdict} |")
    return "\n".join(lines)


# --- Summaries ----------------------------------------------------------------------

def _stats(values):
    values = np.asarray(values, "float64")
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1
            else 0.0, "n": int(len(values))}


def _format(stats):
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def summarize(rows):
    """Per target and size: every strategy's mean ± std, and the table's verdict."""
    groups = {}
    for row in rows:
        key = (row["target"], row["size"])
        label = f"{row['strategy']}@{row['cut']}" if row["cut"] else row["strategy"]
        groups.setdefault(key, {}).setdefault(label, []).append(row["val_accuracy"])
    summary = {}
    for (target, size), by_label in groups.items():
        stats = {label: _stats(v) for label, v in by_label.items()}
        strategies = {r: stats[f"{s}@{c}" if c else s] for r, (s, c) in STRATEGIES.items()}
        best = max(strategies, key=lambda r: strategies[r]["mean"])
        similarity = "similar" if target == "similar" else "different"
        prescribed = PRESCRIBED[(size, similarity)]
        chosen = max(prescribed, key=lambda r: strategies[r]["mean"])
        gap = strategies[best]["mean"] - strategies[chosen]["mean"]
        noise = 2 * max(strategies[best]["std"], strategies[chosen]["std"])
        summary[f"{target}/{size}"] = {
            "strategies": strategies, "depth": stats,
            "cuts": [c for c in CUTS if f"frozen@{c}" in stats], "best": best,
            "prescribed": list(prescribed), "prescribed_best": chosen,
            "gap": gap, "within_noise": bool(gap <= noise),
        }
    return summary


def format_table(summary):
    """The quadrant x strategy table as markdown (mean ± std; best in bold, * prescribed)."""
    lines = ["| target / size | R1 frozen@fc2 | R2 frozen@conv1 | R3 finetuned@fc2 | "
             "R4 scratch | best | table's choice |",
             "|---|---|---|---|---|---|---|"]
    for key, s in summary.items():
        cells = []
        for r in STRATEGIES:
            text = _format(s["strategies"][r]) + (" *" if r in s["prescribed"] else "")
            cells.append(f"**{text}**" if r == s["best"] else text)
        verdict = ("best" if s["gap"] == 0 else
                   f"{s['gap'] * 100:.1f} points behind, "
                   f"{'within' if s['within_noise'] else 'outside'} noise")
        lines.append(f"| {key} | {' | '.join(cells)} | {s['best']} | "
                     f"{'/'.join(s['prescribed'])}: {verdict} |")
    return "\n".join(lines)


def write_outputs(results, out_dir):
    """study.json, table.md, heatmap.png and one depth-curve PNG per target in `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    with open(os.path.join(out_dir, "study.json"), "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    table = format_table(results["summary"])
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)

    summary = results["summary"]
    keys = list(summary)
    grid = np.array([[summary[k]["strategies"][r]["mean"] for r in STRATEGIES] for k in keys])
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(keys) + 1.5))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(STRATEGIES)), [f"{r}\n{s}{'@' + c if c else ''}"
                                           for r, (s, c) in STRATEGIES.items()])
    ax.set_yticks(range(len(keys)), keys)
    for i, k in enumerate(keys):
        for j, r in enumerate(STRATEGIES):
            st = summary[k]["strategies"][r]
            mark = "*" if r in summary[k]["prescribed"] else ""
            ax.text(j, i, f"{st['mean']:.3f}{mark}\n±{st['std']:.3f}", ha="center",
                    va="center", color="white" if st["mean"] < grid.mean() else "black",
                    fontsize=8)
    fig.colorbar(image, label="val accuracy")
    ax.set_title("seed_cnn pretrained on Fashion-MNIST 0-4: strategy x quadrant (* the table's)")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "heatmap.png"), dpi=100)
    plt.close(fig)

    for target in dict.fromkeys(k.split("/")[0] for k in keys):
        sizes = [k for k in keys if k.startswith(target + "/")]
        fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 3.8), squeeze=False)
        for ax, key in zip(axes[0], sizes):
            depth, cuts = summary[key]["depth"], summary[key]["cuts"]
            for strategy, style in (("frozen", "o-"), ("finetuned", "s-")):
                means = [depth[f"{strategy}@{c}"]["mean"] for c in cuts]
                stds = [depth[f"{strategy}@{c}"]["std"] for c in cuts]
                ax.errorbar(cuts, means, yerr=stds, fmt=style, capsize=3,
                            label=f"{strategy} transfer")
            scratch = depth["scratch"]
            ax.axhline(scratch["mean"], color="grey", linestyle="--", label="from scratch")
            ax.axhspan(scratch["mean"] - scratch["std"], scratch["mean"] + scratch["std"],
                       color="grey", alpha=0.2)
            ax.set_title(f"{key} (seed_cnn)")
            ax.set_xlabel("layers kept (cut after)")
            ax.set_ylabel("val accuracy")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"depth_{target}.png"), dpi=100)
        plt.close(fig)

    if "lite" in results:
        fig, ax = plt.subplots(figsize=(5, 3.8))
        for name, by_cut in results["lite"].items():
            ax.errorbar(LITE_CUTS, [by_cut[c]["mean"] for c in LITE_CUTS],
                        yerr=[by_cut[c]["std"] for c in LITE_CUTS], fmt="o-", capsize=3,
                        label=name)
        ax.set_title("EfficientNet-Lite0 (ImageNet), frozen, new head")
        ax.set_xlabel("cut")
        ax.set_ylabel("val accuracy")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "depth_efficientnet_lite0.png"), dpi=100)
        plt.close(fig)
