"""The regime advisor: measures a dataset's size and its similarity to the
pretraining data, picks the regime, the cut and the initialisation, and says why.

    training images --(one pass over a seeded sample, <= 2,000)--> features at every
      named cut, of the pretrained backbone and of the same one at random init
      --> LogME per cut (H-score, k-NN beside it) --> the scores' decision
      --> pilot runs on the sample (a frozen head per cut, a short fine-tune, on large
          data a short run from scratch; scored on held-out images) --> `Advice`

Similarity is measured, not guessed, with LogME (transferability.py): the evidence
of a Bayesian linear model from the features to the 0/1 labels (one-hot classes, or
each image's label vector with task=multi_label) -- no training, one
eigendecomposition per cut. The features
are scored as the new head would see them: pooled as the regime pools them (a
3 x 3 grid of averages below `top`) and standardised. H-score (Bao et al.,
ICIP 2019) and k-NN accuracy (mAP, with several labels per image) are printed
beside it.

How it decides (`decide`; the margins are `Thresholds`, justified in docs/advisor.md):

- size: `small` below `large_examples` training images, else `large`;
- cut: the best-scoring cut; `top` when it scores within `similar_margin` of the best:
  then the data is *similar* (the table's "cut off the last layer"), else
  *different* (keep the layers up to the best earlier cut);
- init, large data only: `scratch` (every weight random, `large_different`)
  when pretraining adds less than `scratch_margin` to the score at the cut;
  small data keeps the pretrained weights frozen, as the table says.

The pilots (pilots.py) can decide after the scores: short real runs on the sample,
scored on held-out images. This module measures and decides without training
(transferability.py holds the scores' arithmetic); the whole advisor, pilots
included, is `pilots.advise`, and `--regime=auto` is carried out by prepare.py.

Example:
    advice, sample = measure(plan, datasets)
    advice.regime, advice.cut, advice.init, advice.reasons
"""

import dataclasses
import math
import os
import time

import keras
import numpy as np

from tl_keras import (arrays, backbones, features as features_lib, folded, model as model_lib,
                      run_folder)
from tl_keras.transferability import h_score, knn_score, logme

SAMPLE = 2000          # training images scored, by default
MIN_PER_CLASS = 2      # fewer images of a class (a label) in the sample: it cannot be scored
GRID = 3               # pool_grid below `top`, as small_different


@dataclasses.dataclass(frozen=True)
class Thresholds:
    large_examples: int = 10_000   # training images from which a dataset is "large"
    similar_margin: float = 0.02   # top's LogME within this of the best cut: similar
    scratch_margin: float = 0.10   # pretraining adds less than this at the best cut: scratch
    costlier_margin: float = 0.005  # a pilot that trains more than the table's choice must
                                    # beat it by this at its 95% lower bound (pilots.py)

    @classmethod
    def from_config(cls, advisor):
        """The thresholds `config.advisor` (configs/base.py) sets."""
        return cls(large_examples=advisor.large_examples,
                   similar_margin=advisor.similar_margin,
                   scratch_margin=advisor.scratch_margin,
                   costlier_margin=advisor.costlier_margin)




def standardise(features):
    """The features as `feature_norm` gives them to the head (features.norm_statistics)."""
    mean, variance = features_lib.norm_statistics(features)
    return (np.asarray(features, "float64") - mean) / np.sqrt(variance)


# --- Features at every cut -----------------------------------------------------------

def cut_layers(backbone_name, cuts=backbones.CUT_POINTS, image_size=32):
    """{cut: layer name} of the cuts that can be scored, and the names of those that cannot.

    A named cut point the backbone does not define, or a layer name it lacks,
    cannot be scored; the advisor says so and scores the rest.
    """
    spec = backbones.get_backbone(backbone_name)
    base = None
    found, missing = {}, []
    for cut in cuts:
        if cut in spec.cuts:
            found[cut] = spec.cuts[cut]
            continue
        if base is None:  # a layer name: looked up in the backbone itself
            base = backbones.build_backbone(backbone_name, "none", image_size).base
        try:
            backbones.cut_output(base, cut)
            found[cut] = cut
        except ValueError:
            missing.append(cut)
    return found, missing


def pool_grid_for(cut):
    return 1 if cut == "top" else GRID


def cut_extractor(backbone_name, weights, image_size, channels, layers, name):
    """One model: raw pixels -> {cut: pooled features} for every cut in `layers`
    ({cut: layer name}), each pooled as the head of a run cut there sees it."""
    base = backbones.build_backbone(backbone_name, weights=weights, image_size=image_size,
                                    cut="top").base
    inputs = keras.Input((image_size, image_size, channels), name="images")
    x = model_lib.preprocess_layer(backbone_name, channels)(inputs)
    maps = keras.Model(backbones.image_input(base), [backbones.cut_output(base, layer)
                                                     for layer in layers.values()],
                       name=f"{name}_cuts")(x)
    outputs = {}
    prefix_tokens = backbones.get_backbone(backbone_name).prefix_tokens
    for cut, feature_map in zip(layers, maps):
        outputs[f"{name}/{cut}"] = model_lib.pool(feature_map, pool_grid_for(cut), f"{cut}_",
                                                  prefix_tokens=prefix_tokens)
    return keras.Model(inputs, outputs, name=f"{name}_extractor")


@dataclasses.dataclass
class Sample:
    """Features of one pass over (up to `SAMPLE`) training images."""
    features: dict   # "pretrained/<cut>" | "random/<cut>" -> [N, D] float32
    labels: np.ndarray  # class indices [N], or label vectors [N, classes] (multi_label)
    whole_view: bool  # every training image: a run can take it as a cached view
    seconds: float
    images: np.ndarray = None  # the sampled images [N, H, W, C] uint8, kept for pilot runs


def extract(data, backbone_name, weights, image_size, layers, sample=SAMPLE, seed=0,
            verbose=1, keep_images=False):
    """Features of the first `sample` training images at every cut of `layers`,
    pretrained and at random init, in one pass.

    The images are the first read of `data.plain_train()` when `data` has it
    (`data.Datasets`: seeded order, no augmentation, so the same images and
    scores every time), else of `data.train`. Random init is the same
    architecture built under `seed`. With `weights` "none" there is no
    pretrained backbone: random init only. `keep_images`: the sampled images
    are read into memory first and kept (`Sample.images`, for pilot runs).
    """
    start = time.time()
    keras.utils.set_random_seed(seed)
    pretrained = weights not in (None, "none")
    parts = [cut_extractor(backbone_name, "none", image_size, data.channels, layers, "random")]
    if pretrained:
        parts.insert(0, cut_extractor(backbone_name, weights, image_size, data.channels,
                                      layers, "pretrained"))
    images = keras.Input((image_size, image_size, data.channels), name="images")
    outputs = {}
    for part in parts:
        outputs.update(part(images))
    n = min(int(sample), int(data.train_examples))
    plain = getattr(data, "plain_train", None)
    source = plain() if plain is not None else data.train
    batch = features_lib.INFERENCE_BATCH
    if isinstance(source, tuple):
        x, y = source
        source = (x[:n], arrays.as_labels(y[:n]))
    else:  # a tf.data pipeline, used through its own API (no TensorFlow import here)
        source = source.unbatch().take(n).batch(batch)
        if keep_images:
            pairs = list(source.as_numpy_iterator())
            source = (np.concatenate([x for x, _ in pairs]),
                      arrays.as_labels(np.concatenate([y for _, y in pairs])))
    out, labels = folded.predict(keras.Model(images, outputs), source, batch, verbose=verbose,
                                 total=n)
    labels = arrays.as_labels(labels)
    whole = len(labels) == int(data.train_examples) and not getattr(data, "drop_remainder", False)
    return Sample({k: np.asarray(v, "float32") for k, v in out.items()}, labels, whole,
                  time.time() - start, images=source[0] if keep_images else None)


# --- The decision ----------------------------------------------------------------------

@dataclasses.dataclass
class Advice:
    regime: str
    cut: str
    init: str
    pool_grid: int
    size: str                # small | large
    similarity: str          # similar | different
    reasons: str             # one sentence
    scores: dict             # cut -> {"pretrained", "random", "gain", "h_pretrained", "h_random"}
    train_examples: int
    per_class: dict          # class name -> training images in the sample
    sample: int
    thresholds: dict
    notes: list = dataclasses.field(default_factory=list)  # cuts not scored, and why
    seconds: float = 0.0
    # Pilot runs (advisor.pilots): name -> {metric: score on the held-out images, "seconds"}
    pilots: dict = dataclasses.field(default_factory=dict)
    metric: str = "accuracy"  # what the pilots are scored by: the task's (accuracy | mAP)
    pilot_images: dict = dataclasses.field(default_factory=dict)  # {"train", "held_out", "epochs"}
    decided_by: str = "scores"  # scores (LogME, today's rule) | pilots
    backbone: str = ""
    backbones: dict = dataclasses.field(default_factory=dict)  # --backbone=a,b: each one's advice

    def strategy(self):
        """What the advice trains, in the pilots' names: frozen@cut | finetuned@cut | scratch."""
        if self.init == "scratch":
            return "scratch"
        return f"{'frozen' if self.regime.startswith('small') else 'finetuned'}@{self.cut}"

    def measure(self):
        """(what, value) the advice is ranked by among backbones: its strategy's pilot
        score (accuracy, or mAP) on the held-out images when the pilots ran, else LogME
        at its cut (comparable across models: You et al. 2021)."""
        if self.strategy() in self.pilots:
            return f"pilot_{self.metric}", self.pilots[self.strategy()][self.metric]
        row = self.scores[self.cut]
        return "LogME", row.get("pretrained", row["random"])

    def config_overrides(self):
        """What `--regime=auto` sets in the run's config (the backbone too, chosen
        among several)."""
        out = {"regime": self.regime, "cut": self.cut, "init": self.init,
               "pool_grid": self.pool_grid}
        if len(self.backbones) > 1:
            out["backbone"] = self.backbone
        return out

    def decision(self):
        """What was decided and from what, without timings: `config.json` records it."""
        out = {k: v for k, v in self.to_dict().items() if k not in ("seconds", "thresholds")}
        out["per_class"] = list(self.per_class.values())  # class names may hold "." or "/"
        return out

    def to_dict(self):
        return dataclasses.asdict(self)


def score(sample):
    """{cut: scores} of a `Sample`: LogME, H-score and k-NN (accuracy; mAP of label
    vectors) of each cut's standardised features, pretrained and random, and the gain
    (pretrained - random LogME)."""
    scores = {}
    for key in sample.features:
        init, cut = key.split("/")
        f = standardise(sample.features[key])
        row = scores.setdefault(cut, {})
        row[init] = round(logme(f, sample.labels), 4)
        row[f"h_{init}"] = round(h_score(f, sample.labels), 3)
        row[f"knn_{init}"] = round(knn_score(f, sample.labels), 4)
    for row in scores.values():
        if "pretrained" in row:
            row["gain"] = round(row["pretrained"] - row["random"], 4)
    return scores


def decide(scores, train_examples, thresholds=Thresholds()):
    """(regime, cut, init, size, similarity, reasons) from the scores per cut."""
    size = "large" if train_examples >= thresholds.large_examples else "small"
    size_reason = (f"{train_examples:,} training images are "
                   f"{'at least' if size == 'large' else 'fewer than'} "
                   f"{thresholds.large_examples:,} ({size})")
    if not any("pretrained" in row for row in scores.values()):
        return ("large_different", "top", "scratch", size, "different",
                f"{size_reason}; no pretrained weights to transfer, so every weight trains "
                "from random init")
    best = max(scores, key=lambda c: scores[c]["pretrained"])
    top_gap = (scores[best]["pretrained"] - scores["top"]["pretrained"]
               if "top" in scores else math.inf)
    cut = "top" if top_gap <= thresholds.similar_margin else best
    similarity = "similar" if cut == "top" else "different"
    gain = scores[cut]["gain"]
    if similarity == "similar":
        why = (f"the top cut scores within {thresholds.similar_margin} of the best "
               f"(LogME {scores['top']['pretrained']:.3f}), so the data is similar")
    elif "top" not in scores:
        why = (f"the top cut was not scored, so the data counts as different; the best "
               f"cut is {best!r} (LogME {scores[best]['pretrained']:.3f})")
    else:
        why = (f"the top cut scores {top_gap:.3f} below the best cut, {best!r} "
               f"(LogME {scores[best]['pretrained']:.3f}), so the data is different "
               f"and the layers above {best!r} are dropped")
    if size == "large" and gain < thresholds.scratch_margin:
        return ("large_different", cut, "scratch", size, similarity,
                f"{size_reason}; {why}; pretraining adds only {gain:.3f} to the score "
                f"at {cut!r} (under {thresholds.scratch_margin}), so every weight trains "
                "from random init")
    regime = f"{size}_{similarity}"
    action = ("the backbone stays frozen and a new head trains" if size == "small" else
              "a new head trains, then everything at a low learning rate")
    return (regime, cut, "pretrained", size, similarity,
            f"{size_reason}; {why}; pretraining adds {gain:.3f} at {cut!r}, so {action}")


def scored_weights(plan):
    """The weights the advisor scores as pretrained: "none" (random init alone) when the
    plan has none or trains from scratch."""
    weights = "none" if plan.config.init == "scratch" else plan.weights
    return "none" if weights is None else weights


def measure(plan, data, sample=SAMPLE, thresholds=Thresholds(), cuts=backbones.CUT_POINTS,
            verbose=1, keep_images=False):
    """Scores `data` (a `data.Datasets`) with the plan's backbone at every cut and decides
    by the scores (`decide`); returns (`Advice`, `Sample`). The pilots
    (pilots.py) can decide after it.

    When the sample is the whole training set, a run of the advised regime
    takes its features at the advised cut as its first cached view
    (`train.finetune(..., first_view=...)`): un-augmented, beside the
    augmented views it computes. `keep_images`: see `extract`.
    """
    start = time.time()
    config = plan.config
    layers, missing = cut_layers(config.backbone, cuts, plan.image_size)
    notes = [f"cut {c!r} is neither a named cut point of {config.backbone} nor one of its "
             "layers: not scored" for c in missing]
    if not layers:
        raise ValueError(f"none of the cuts {', '.join(cuts)} exists in {config.backbone}")
    if len(data.class_names) < 2:
        raise ValueError(f"the advisor needs at least 2 classes, found {len(data.class_names)}")
    if int(sample) < MIN_PER_CLASS * len(data.class_names):
        raise ValueError(f"advisor.sample={sample} cannot hold {MIN_PER_CLASS} images of each of "
                         f"{len(data.class_names)} classes: give at least "
                         f"{MIN_PER_CLASS * len(data.class_names)}")
    measured = extract(data, config.backbone, scored_weights(plan), plan.image_size, layers,
                       sample=sample, seed=config.seed, verbose=verbose,
                       keep_images=keep_images)
    counts = arrays.label_counts(measured.labels, len(data.class_names))
    few = [f"{data.class_names[i]} ({counts[i]})" for i in range(len(counts))
           if counts[i] < MIN_PER_CLASS]
    if few:
        kind = "labels" if measured.labels.ndim == 2 else "classes"
        raise ValueError(f"too few images to score: the sample of "
                         f"{len(measured.labels)} images holds fewer than {MIN_PER_CLASS} of "
                         f"{len(few)} {kind}: {', '.join(few[:5])}"
                         f"{' ...' if len(few) > 5 else ''}; give more images of "
                         f"{'them' if len(few) > 1 else 'it'} or a larger advisor.sample")
    scores = score(measured)
    if "top" not in scores:
        notes.append("the top cut was not scored: the data counts as different")
    regime, cut, init, size, similarity, reasons = decide(
        scores, int(data.train_examples), thresholds)
    advice = Advice(
        backbone=config.backbone, regime=regime, cut=cut, init=init,
        pool_grid=pool_grid_for(cut), size=size, similarity=similarity, reasons=reasons,
        scores=scores, train_examples=int(data.train_examples),
        per_class={name: int(c) for name, c in zip(data.class_names, counts)},
        sample=len(measured.labels), thresholds=dataclasses.asdict(thresholds), notes=notes,
        seconds=round(time.time() - start, 2))
    return advice, measured


def format_table(advice):
    """The scores per cut, the pilots, and the decision, as printed by the tools."""
    width = max(8, *(len(cut) for cut in advice.scores))
    pilots = advice.pilots
    lines = [f"{'cut':<{width}} {'LogME':>8} {'random':>8} {'gain':>8} {'H-score':>8} "
             f"{'k-NN':>8}" + (f" {'pilot':>8}" if pilots else "")]
    for cut, row in advice.scores.items():
        mark = "  <- " + advice.cut if cut == advice.cut and advice.init != "scratch" else ""
        pre = row.get("pretrained")
        knn = row.get("knn_pretrained", row.get("knn_random"))
        pilot = pilots.get(f"frozen@{cut}", {}).get(advice.metric)
        lines.append(f"{cut:<{width}} {_num(pre):>8} {_num(row['random']):>8} "
                     f"{_num(row.get('gain')):>8} {_num(row.get('h_pretrained', row['h_random'])):>8} "
                     f"{_num(knn):>8}" + (f" {_num(pilot):>8}" if pilots else "") + mark)
    if pilots:
        images = advice.pilot_images
        trained = ", ".join([f"{name} {p[advice.metric]:.3f} ({p['seconds']:.0f} s)"
                             for name, p in pilots.items() if not name.startswith("frozen@")]
                            + [f"{name} not run" for name in images.get("not_run", ())])
        lines.append(f"Pilots ({images['train']} images, scored by {advice.metric} on "
                     f"{images['held_out']} held out; 'pilot' above: a frozen head there): "
                     f"{images['epochs']} epochs {trained}")
    lines.append(f"Advice: --regime={advice.regime} --cut={advice.cut}"
                 f"{' --init=scratch' if advice.init == 'scratch' else ''} "
                 f"(sample of {advice.sample} images, {advice.seconds:.0f} s)")
    lines.append(f"Why: {advice.reasons}.")
    lines += [f"Note: {note}" for note in advice.notes]
    return "\n".join(lines)


def _num(value):
    return "-" if value is None else f"{value:.3f}"


def write(advice, folder):
    """`folder/advice.json` and `folder/advice.png` (LogME per cut, pretrained and
    random init), each written whole; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    os.makedirs(folder, exist_ok=True)
    path_json = os.path.join(folder, "advice.json")
    run_folder.write_json(path_json, advice.to_dict())
    cuts = list(advice.scores)
    x = np.arange(len(cuts))
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for offset, init, colour in ((-0.2, "pretrained", "tab:blue"), (0.2, "random", "tab:grey")):
        values = [advice.scores[c].get(init) for c in cuts]
        if all(v is None for v in values):
            continue
        ax.bar(x + offset, [np.nan if v is None else v for v in values], 0.4, color=colour,
               label=f"{init}{' init' if init == 'random' else ''}")
    ax.set_xticks(x, [f"{c}\n(chosen)" if c == advice.cut else c for c in cuts])
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("LogME (higher: more transferable)")
    ax.set_title(f"{advice.regime}{' (init=scratch)' if advice.init == 'scratch' else ''}, "
                 f"cut {advice.cut!r}; {advice.sample} images", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path_png = os.path.join(folder, "advice.png")
    run_folder.write_atomically(path_png, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path_json, path_png


# --- Several backbones: --backbone=a,b,c -----------------------------------------------

def backbone_names(value):
    """The backbones of `--backbone=a,b,c` (one or more; each must exist)."""
    names = [n.strip() for n in str(value).split(",") if n.strip()]
    if not names:
        raise ValueError("--backbone names no backbone")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--backbone={value} names {', '.join(twice)} more than once")
    for name in names:
        backbones.get_backbone(name)  # an unknown name: one line listing the valid ones
    return names


def choose_backbone(advices):
    """The advice of the best backbone by `Advice.measure` (the pilots' accuracy is
    compared only with the pilots', LogME only with LogME); it records every backbone's
    advice in `backbones`."""
    kind = {a.measure()[0] for a in advices}
    if len(kind) > 1:  # pilots ran for some only (no pretrained weights): rank by LogME
        measures = [a.scores[a.cut].get("pretrained", a.scores[a.cut]["random"])
                    for a in advices]
    else:
        measures = [a.measure()[1] for a in advices]
    best = dataclasses.replace(advices[int(np.argmax(measures))])
    best.backbones = {a.backbone: {"regime": a.regime, "cut": a.cut, "init": a.init,
                                   "measure": dict([a.measure()]), "seconds": a.seconds}
                      for a in advices}
    return best


def format_backbones(best):
    """One row per backbone and the choice, as the tools print it."""
    width = max(8, *(len(name) for name in best.backbones))
    lines = [f"{'backbone':<{width}} {'advice':<34} measured by"]
    for name, row in best.backbones.items():
        advice = (f"{row['regime']} at {row['cut']}"
                  f"{', init=scratch' if row['init'] == 'scratch' else ''}")
        (what, value), = row["measure"].items()
        mark = "  <- best" if name == best.backbone else ""
        lines.append(f"{name:<{width}} {advice:<34} {what.replace('_', ' ')} {value:.3f}{mark}")
    return "\n".join(lines)
