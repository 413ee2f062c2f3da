"""The regime advisor: measures a dataset's size and its similarity to the
pretraining data, picks the regime, the cut and the initialisation, and says why.

    training images --(one pass over a seeded sample, <= 2,000)--> features at every
      named cut, of the pretrained backbone and of the same one at random init
      --> LogME per cut (H-score, k-NN beside it) --> the scores' decision
      --> pilot runs on the sample (a frozen head per cut, a short fine-tune, on large
          data a short run from scratch; scored on held-out images) --> `Advice`

Similarity is measured, not guessed, with LogME (You et al., "LogME: Practical
Assessment of Pre-trained Models for Transfer Learning", ICML 2021): the
evidence (marginal likelihood per example) of a Bayesian linear model from the
features to the one-hot labels -- no training, one SVD per cut. The features
are scored as the new head would see them: pooled as the regime pools them (a
3 x 3 grid of averages below `top`) and standardised. H-score (Bao et al.,
ICIP 2019) is the cheap cross-check printed beside it.

How it decides (`decide`; the margins are `Thresholds`, justified in docs/advisor.md):

- size: `small` below `large_examples` training images, else `large`;
- cut: the best-scoring cut; `top` when it scores within `similar_margin` of the best:
  then the data is *similar* (the table's "cut off the last layer"), else
  *different* (keep the layers up to the best earlier cut);
- init, large data only: `scratch` (every weight random, `large_different`)
  when pretraining adds less than `scratch_margin` to the score at the cut;
  small data keeps the pretrained weights frozen, as the table says.

With pilots (`PilotSettings`; `decide_by_pilots`) the measurement decides where
it disagrees outside its noise: another cut's frozen head, a fine-tuned
backbone, or a network trained from scratch replaces the scores' and the
table's choice only when its pilot beats that choice's pilot on the held-out
images (a paired bootstrap's 95% lower bound above 0).

Example:
    advice, _ = advise(plan, datasets, pilots=PilotSettings())
    advice.regime, advice.cut, advice.init, advice.reasons
"""

import dataclasses
import math
import os
import time

import keras
import numpy as np

from tl_keras import backbones, features as features_lib, folded, model as model_lib, run_folder

SAMPLE = 2000          # training images scored, by default
MIN_PER_CLASS = 2      # fewer images of a class in the sample: it cannot be scored
GRID = 3               # pool_grid below `top`, as small_different


@dataclasses.dataclass(frozen=True)
class Thresholds:
    large_examples: int = 10_000   # training images from which a dataset is "large"
    similar_margin: float = 0.02   # top's LogME within this of the best cut: similar
    scratch_margin: float = 0.10   # pretraining adds less than this at the best cut: scratch

    @classmethod
    def from_config(cls, advisor):
        """The thresholds `config.advisor` (configs/base.py) sets."""
        return cls(large_examples=advisor.large_examples,
                   similar_margin=advisor.similar_margin,
                   scratch_margin=advisor.scratch_margin)


# --- Scores ------------------------------------------------------------------------

def logme(features, labels):
    """LogME of `features` [N, D] for integer `labels` [N]: the log evidence per example.

    For each class c, the evidence of y_c (1 where the label is c, else 0)
    under y = F w + noise, w ~ N(0, 1/alpha), noise ~ N(0, 1/beta), with
    alpha and beta set to their maximum-evidence values by MacKay's
    fixed-point updates; the mean over classes, divided by N. Higher is
    better; comparable across feature sets of different dimension.
    """
    f = np.asarray(features, "float64")
    labels = np.asarray(labels).reshape(-1)
    n, d = f.shape
    sigma, project = _spectrum(f)
    evidences = []
    for c in np.unique(labels):
        y = (labels == c).astype("float64")
        x2 = project(y) ** 2                         # y in the basis of F's left vectors
        outside = max(float(y @ y - x2.sum()), 0.0)  # the part of y no weights reach
        evidences.append(_evidence(sigma, x2, outside, n, d))
    return float(np.mean(evidences)) / n


def _spectrum(f):
    """(sigma, project): the nonzero eigenvalues of F^T F (squared singular values of F)
    and y -> U^T y for F's left singular vectors U, from the smaller of the two Gram
    matrices (an eigendecomposition of min(N, D) x min(N, D): faster than an SVD)."""
    n, d = f.shape
    gram = f @ f.T if n <= d else f.T @ f
    sigma, vectors = np.linalg.eigh(gram)
    keep = sigma > max(sigma.max(), 0) * 1e-10 * max(n, d)
    sigma, vectors = sigma[keep], vectors[:, keep]
    if n <= d:  # the eigenvectors of F F^T are U
        return sigma, lambda y: vectors.T @ y
    scale = 1 / np.sqrt(sigma)  # U = F V / s
    return sigma, lambda y: (vectors.T @ (f.T @ y)) * scale


def _fit(sigma, x2, outside, n, iterations=100):
    """(alpha, beta) of maximum evidence: MacKay's fixed point, from 1, 1."""
    alpha, beta = 1.0, 1.0
    for _ in range(iterations):
        t = alpha / beta
        gamma = float((sigma / (sigma + t)).sum())
        m2 = float((sigma * x2 / (sigma + t) ** 2).sum())           # |m|^2
        res2 = float((x2 * (t / (sigma + t)) ** 2).sum()) + outside  # |F m - y|^2
        alpha = gamma / (m2 + 1e-12)
        beta = (n - gamma) / (res2 + 1e-12)
        if abs(alpha / beta - t) <= 1e-6 * t:
            break
    return alpha, beta


def _evidence(sigma, x2, outside, n, d):
    """log p(y | alpha, beta) at the maximum-evidence alpha, beta (You et al., eq. 2)."""
    alpha, beta = _fit(sigma, x2, outside, n)
    t = alpha / beta
    m2 = float((sigma * x2 / (sigma + t) ** 2).sum())
    res2 = float((x2 * (t / (sigma + t)) ** 2).sum()) + outside
    log_det = float(np.log(alpha + beta * sigma).sum()) + (d - len(sigma)) * math.log(alpha)
    return (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - alpha / 2 * m2
            - beta / 2 * res2 - log_det / 2 - n / 2 * math.log(2 * math.pi))


def h_score(features, labels, shrinkage=1e-3):
    """H-score (Bao et al. 2019): tr(cov(f)^-1 cov(E[f | y])), f standardised;
    `shrinkage` x the mean variance is added to cov(f)'s diagonal for stability."""
    f = np.asarray(features, "float64")
    labels = np.asarray(labels).reshape(-1)
    f = f - f.mean(axis=0)
    cov = f.T @ f / len(f)
    cov += shrinkage * max(np.trace(cov) / len(cov), 1e-12) * np.eye(len(cov))
    means = np.zeros_like(f)
    for c in np.unique(labels):
        means[labels == c] = f[labels == c].mean(axis=0)
    between = means.T @ means / len(f)
    return float(np.trace(np.linalg.solve(cov, between)))


def knn_accuracy(features, labels, k=5, chunk=1024):
    """Leave-one-out k-NN accuracy of `features` (each image classified by the majority of
    its `k` nearest other images, Euclidean; a tie goes to the lowest class): a plain,
    strong score of frozen features (arXiv 2503.18528), beside LogME and H-score."""
    f = np.asarray(features, "float64")
    labels = np.asarray(labels).reshape(-1).astype(int)
    n = len(f)
    if n < 2:
        return float("nan")
    k = min(k, n - 1)
    squares = (f ** 2).sum(axis=1)
    correct = 0
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        distance = squares[rows, None] - 2 * f[rows] @ f.T + squares[None, :]
        distance[np.arange(distance.shape[0]), np.arange(start, rows.stop)] = np.inf  # not itself
        nearest = np.argpartition(distance, k - 1, axis=1)[:, :k]
        votes = np.zeros((distance.shape[0], labels.max() + 1))
        np.add.at(votes, (np.repeat(np.arange(distance.shape[0]), k), labels[nearest].ravel()), 1)
        correct += int((votes.argmax(axis=1) == labels[rows]).sum())
    return correct / n


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
    labels: np.ndarray
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
        source = (x[:n], np.asarray(y[:n]).reshape(-1).astype("int32"))
    else:  # a tf.data pipeline, used through its own API (no TensorFlow import here)
        source = source.unbatch().take(n).batch(batch)
        if keep_images:
            pairs = list(source.as_numpy_iterator())
            source = (np.concatenate([x for x, _ in pairs]),
                      np.concatenate([y for _, y in pairs]).reshape(-1).astype("int32"))
    out, labels = folded.predict(keras.Model(images, outputs), source, batch, verbose=verbose,
                                 total=n)
    labels = np.asarray(labels).reshape(-1).astype("int32")
    whole = len(labels) == int(data.train_examples) and not getattr(data, "drop_remainder", False)
    return Sample({k: np.asarray(v, "float32") for k, v in out.items()}, labels, whole,
                  time.time() - start, images=source[0] if keep_images else None)


# --- Pilot runs: what the scores cannot see ------------------------------------------------

PILOT_BATCH = 16     # a pilot's batch at most: a short run on a sample takes enough steps
HEAD_EPOCHS = 20     # a frozen pilot's head trains at least this long (configs/small_*.py's)
BOOTSTRAP = 1000     # resamples of the held-out images for a pilot's noise
CONFIDENCE = 0.95    # a pilot beats another when its gain's one-sided lower bound is above 0


@dataclasses.dataclass(frozen=True)
class PilotSettings:
    """How long the pilots train and what they are scored on (configs/base.py's
    `advisor.pilot_*` keys, whose defaults these are)."""
    passes: float = 2.0       # a trained pilot trains on this many training sets' worth of images
    max_epochs: int = 10      # ... but at most this many epochs of its pilot-train images
    held_out: float = 0.3     # of the sample, stratified by seed: what the pilots are scored on
    scratch: str = "large"    # a from-scratch pilot: on large data | always | never

    @classmethod
    def from_config(cls, advisor):
        """The pilots `config.advisor` asks for; None when `advisor.pilots` is off."""
        if not advisor.pilots:
            return None
        return cls(passes=float(advisor.pilot_passes), max_epochs=int(advisor.pilot_epochs),
                   held_out=float(advisor.pilot_held_out), scratch=str(advisor.scratch_pilot))

    def runs_scratch(self, size):
        """Whether a from-scratch pilot runs for data of `size` (small | large). By default
        on large data only: on small data the table trains no backbone, and within the
        pilots' budget a from-scratch run stays far below what it reaches in a full run
        while it costs the most (docs/advisor.md)."""
        return self.scratch == "always" or (self.scratch == "large" and size == "large")

    def epochs(self, train_examples, pilot_train):
        """Epochs of a trained pilot on `pilot_train` images for a dataset of
        `train_examples`: `passes` x the training set in images, 1 to `max_epochs`.
        A large run trains (epochs - head_epochs) passes through the backbone (8 by
        configs/base.py): on small data the fine-tuned pilot costs about a quarter of
        one such run; on large data, where it is capped, far less."""
        return int(min(self.max_epochs, max(1, round(self.passes * train_examples / pilot_train))))


@dataclasses.dataclass
class Pilot:
    """One pilot: a strategy trained on the pilot-train images, scored on the held-out ones."""
    strategy: str          # frozen | finetuned | scratch
    cut: str
    accuracy: float
    correct: np.ndarray    # [held-out images] bool
    seconds: float
    head: list = None      # a frozen pilot's Dense weights: the fine-tuned pilot starts there

    @property
    def name(self):
        return "scratch" if self.strategy == "scratch" else f"{self.strategy}@{self.cut}"


def pilot_split(labels, held_out, seed):
    """(pilot-train, held-out) indices of the sample: stratified, seeded."""
    from tl_keras import arrays

    return arrays.split_indices(labels, held_out, seed=seed)


def frozen_pilot(features, labels, split, config, num_classes):
    """A new head on a cut's frozen features (the sample's: no forward pass), trained as a
    run's head phase trains (standardised, dropout, AdamW at `learning_rate`; the run's
    `epochs`, at least `HEAD_EPOCHS`: a large run's few epochs are few steps on a sample),
    scored on the held-out images. Returns (accuracy, correct [held-out], Dense weights)."""
    train, held = split
    mean, variance = features_lib.norm_statistics(features[train])
    keras.utils.set_random_seed(config.seed)
    head = keras.Sequential([
        keras.Input(features.shape[1:]),
        keras.layers.Normalization(mean=mean, variance=variance),
        keras.layers.Dropout(config.dropout, seed=config.seed),
        keras.layers.Dense(num_classes, activation="softmax")])
    head.compile(keras.optimizers.AdamW(config.learning_rate, weight_decay=config.weight_decay),
                 "sparse_categorical_crossentropy",
                 steps_per_execution=config.head_steps_per_execution)
    head.fit(features[train], labels[train], batch_size=min(config.batch_size, PILOT_BATCH),
             epochs=max(config.epochs, HEAD_EPOCHS), verbose=0)
    # A call, not `predict`: a new head per cut would retrace predict's function each time.
    predicted = keras.ops.convert_to_numpy(head(features[held])).argmax(axis=-1)
    correct = predicted == labels[held]
    return float(correct.mean()), correct, head.layers[-1].get_weights()


def pilot_config(config, strategy, cut, epochs):
    """The config of a short real run of `strategy` ("finetuned" at `cut`, or "scratch"):
    the caller's config (its recipe and rates) for `epochs`, without augmentation (as
    the frozen pilots' features), one device, quiet. The fine-tuned pilot has no head
    phase: its head starts as the frozen pilot's at that cut ended."""
    from tl_keras import plan as plan_lib

    config = plan_lib.editable(config)
    config.update(epochs=epochs, batch_size=min(config.batch_size, PILOT_BATCH), verbose="0",
                  report=False, validation_freq=epochs + 1, early_stopping=0, augment=False,
                  cached_views=1, distribution="none", workdir="")
    if strategy == "finetuned":
        config.update(regime="large_similar" if cut == "top" else "large_different", cut=cut,
                      init="pretrained", pool_grid=pool_grid_for(cut), head_epochs=0)
    else:
        config.update(regime="large_different", cut="top", init="scratch", pool_grid=1)
    return config


def trained_pilot(config, sample, split, class_names, strategy, cut, epochs, head=None):
    """A real tl_keras run (`train.finetune`) of `strategy` on the pilot-train images, in a
    temporary folder, its head starting from `head` (Dense weights) when given; returns
    (accuracy, correct [held-out]) on the held-out images."""
    import contextlib
    import io
    import tempfile

    from tl_keras import data as data_lib, plan as plan_lib, train

    config = pilot_config(config, strategy, cut, epochs)
    train_idx, held = split
    images, labels = sample.images, sample.labels
    examples = data_lib.from_arrays(images[train_idx], labels[train_idx], class_names,
                                    x_val=images[held], y_val=labels[held], seed=config.seed)
    with tempfile.TemporaryDirectory(prefix="tl_keras_pilot_") as folder:
        config.workdir = os.path.join(folder, "run")
        plan = plan_lib.resolve(config)
        datasets = data_lib.make_datasets(examples, plan.config, plan.image_size)
        keras.utils.set_random_seed(plan.config.seed)  # as train.finetune before it builds
        model, _ = train.build(plan, len(class_names), datasets.channels)
        if head is not None:
            model.get_layer(features_lib.HEAD_LAYERS[-1]).set_weights(head)
        with contextlib.redirect_stdout(io.StringIO()):
            train.finetune(plan, datasets, model=model, save_models=False)
    probabilities, _ = folded.predict(model, (images[held], labels[held]),
                                      features_lib.INFERENCE_BATCH)
    correct = np.asarray(probabilities).argmax(axis=-1) == labels[held]
    return float(correct.mean()), correct


def run_pilots(config, sample, class_names, train_examples, settings, cuts, scored_cut,
               scratch=True, verbose=1):
    """The pilots: a frozen head at every cut in `cuts` (cheap: the sample's features),
    then short runs fine-tuned at the frozen choice's cut (`frozen_choice`: the scores'
    `scored_cut` unless a pilot beats it) and, with `scratch`, from scratch, for
    `settings.epochs(...)` epochs. One progress line each. Returns (pilots by name,
    {"train", "held_out", "epochs"})."""
    split = pilot_split(sample.labels, settings.held_out, config.seed)
    epochs = settings.epochs(train_examples, len(split[0]))
    trained = [("finetuned", None)] + ([("scratch", "top")] if scratch else [])
    total = len(cuts) + len(trained)
    pilots = {}

    def done(pilot):
        pilots[pilot.name] = pilot
        if verbose:
            print(f"Pilot {len(pilots)}/{total}: {pilot.name:<18} held-out accuracy "
                  f"{pilot.accuracy:.3f} ({pilot.seconds:.0f} s)", flush=True)

    for cut in cuts:
        start = time.time()
        accuracy, correct, head = frozen_pilot(sample.features[f"pretrained/{cut}"],
                                               sample.labels, split, config, len(class_names))
        done(Pilot("frozen", cut, accuracy, correct, time.time() - start, head))
    frozen = frozen_choice(pilots, scored_cut, config.seed)
    for strategy, cut in trained:
        cut, head = (frozen.cut, frozen.head) if strategy == "finetuned" else (cut, None)
        start = time.time()
        accuracy, correct = trained_pilot(config, sample, split, class_names, strategy, cut,
                                          epochs, head)
        done(Pilot(strategy, "" if strategy == "scratch" else cut, accuracy, correct,
                   time.time() - start))
    return pilots, {"train": len(split[0]), "held_out": len(split[1]), "epochs": epochs}


def lower_bound(a, b, seed=0, resamples=BOOTSTRAP, confidence=CONFIDENCE):
    """The one-sided `confidence` lower bound of pilot `a`'s accuracy minus pilot `b`'s:
    a paired bootstrap over the held-out images both were scored on."""
    gain = a.correct.astype("float64") - b.correct.astype("float64")
    rng = np.random.default_rng(seed)
    means = gain[rng.integers(0, len(gain), (resamples, len(gain)))].mean(axis=1)
    return float(np.quantile(means, 1 - confidence))


def frozen_choice(pilots, scored_cut, seed=0):
    """The frozen pilot at the cut the scores chose (`decide`), unless the best frozen
    pilot beats it outside noise: a measurement overrides a prediction only then."""
    chosen = pilots[f"frozen@{scored_cut}"]
    best = max((p for p in pilots.values() if p.strategy == "frozen"), key=lambda p: p.accuracy)
    return best if lower_bound(best, chosen, seed) > 0 else chosen


def decide_by_pilots(pilots, scored_cut, train_examples, sizes, thresholds, seed=0):
    """(regime, cut, init, size, similarity, reasons) from the pilots.

    The table's choice for the data's size is kept -- small: the frozen head
    at `frozen_choice`'s cut; large: fine-tuned at that cut -- unless another
    pilot beats it outside the held-out images' noise (`lower_bound` > 0); then
    the best of those that do.
    """
    size = "large" if train_examples >= thresholds.large_examples else "small"
    frozen = frozen_choice(pilots, scored_cut, seed)
    table = frozen if size == "small" else next(
        p for p in pilots.values() if p.strategy == "finetuned")
    bounds = {name: lower_bound(p, table, seed) for name, p in pilots.items() if p is not table}
    winners = [pilots[name] for name, bound in bounds.items() if bound > 0]
    chosen = max(winners, key=lambda p: p.accuracy) if winners else table
    cut = "top" if chosen.strategy == "scratch" else chosen.cut
    similarity = "similar" if cut == "top" and chosen.strategy != "scratch" else "different"
    if chosen.strategy == "frozen":
        regime, init = f"small_{similarity}", "pretrained"
    elif chosen.strategy == "finetuned":
        regime, init = f"large_{similarity}", "pretrained"
    else:
        regime, init = "large_different", "scratch"
    ran = (f"pilots on {sizes['train']:,} of the {sizes['train'] + sizes['held_out']:,} "
           f"sampled images, scored on the {sizes['held_out']:,} held out: ")
    size_reason = (f"{train_examples:,} training images are "
                   f"{'at least' if size == 'large' else 'fewer than'} "
                   f"{thresholds.large_examples:,}, so the table says {table.name}")
    if chosen is table:
        other = pilots[max(bounds, key=lambda n: pilots[n].accuracy)]
        gap = round(100 * (other.accuracy - table.accuracy), 1)
        how = (f"{gap:.1f} points above it, within noise" if gap > 0 else
               f"{-gap:.1f} points below" if gap < 0 else "as accurate")
        why = (f"{ran}{table.name} {table.accuracy:.3f}; no other pilot beat it outside noise "
               f"(the next best, {other.name} {other.accuracy:.3f}, {how})")
    else:
        why = (f"{ran}{chosen.name} {chosen.accuracy:.3f} beat {table.name} "
               f"{table.accuracy:.3f} by {100 * (chosen.accuracy - table.accuracy):.1f} points "
               f"(95% lower bound {100 * bounds[chosen.name]:+.1f}), so the measurement "
               "overrides the table")
    return regime, cut, init, size, similarity, f"{size_reason}; {why}"


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
    # Pilot runs (advisor.pilots): name -> {"accuracy" on the held-out images, "seconds"}
    pilots: dict = dataclasses.field(default_factory=dict)
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
        accuracy on the held-out images when the pilots ran, else LogME at its cut
        (comparable across models: You et al. 2021)."""
        if self.strategy() in self.pilots:
            return "pilot_accuracy", self.pilots[self.strategy()]["accuracy"]
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
    """{cut: scores} of a `Sample`: LogME, H-score and k-NN accuracy of each cut's
    standardised features, pretrained and random, and the gain (pretrained - random LogME)."""
    scores = {}
    for key in sample.features:
        init, cut = key.split("/")
        f = standardise(sample.features[key])
        row = scores.setdefault(cut, {})
        row[init] = round(logme(f, sample.labels), 4)
        row[f"h_{init}"] = round(h_score(f, sample.labels), 3)
        row[f"knn_{init}"] = round(knn_accuracy(f, sample.labels), 4)
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


def advise(plan, data, sample=SAMPLE, thresholds=Thresholds(), cuts=backbones.CUT_POINTS,
           verbose=1, pilots=None):
    """Measures `data` (a `data.Datasets`) with the plan's backbone; returns (`Advice`, `Sample`).

    `pilots` (`PilotSettings`, or None for the scores alone): short real runs on
    the sample decide (`run_pilots`, `decide_by_pilots`) where there are
    pretrained weights to compare with.

    When the sample is the whole training set, a run of the advised regime
    takes its features at the advised cut as its first cached view
    (`train.finetune(..., first_view=...)`): un-augmented, beside the
    augmented views it computes.
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
    weights = "none" if config.init == "scratch" else plan.weights
    pretrained = weights not in (None, "none")
    measured = extract(data, config.backbone, weights, plan.image_size, layers,
                       sample=sample, seed=config.seed, verbose=verbose,
                       keep_images=pilots is not None and pretrained)
    counts = np.bincount(measured.labels, minlength=len(data.class_names))
    few = [f"{data.class_names[i]} ({counts[i]})" for i in range(len(counts))
           if counts[i] < MIN_PER_CLASS]
    if few:
        raise ValueError(f"too few images to score: the sample of "
                         f"{len(measured.labels)} images holds fewer than {MIN_PER_CLASS} of "
                         f"{len(few)} classes: {', '.join(few[:5])}"
                         f"{' ...' if len(few) > 5 else ''}; give more images of "
                         f"{'them' if len(few) > 1 else 'it'} or a larger advisor.sample")
    scores = score(measured)
    if "top" not in scores:
        notes.append("the top cut was not scored: the data counts as different")
    regime, cut, init, size, similarity, reasons = decide(
        scores, int(data.train_examples), thresholds)
    ran, sizes = {}, {}
    if pilots is not None and pretrained:
        scratch = pilots.runs_scratch(size)
        print("Pilot runs on the sample: a frozen head at each cut, then short runs "
              f"fine-tuned{' and from scratch' if scratch else ''}", flush=True)
        ran, sizes = run_pilots(config, measured, data.class_names, int(data.train_examples),
                                pilots, [c for c in scores if "pretrained" in scores[c]], cut,
                                scratch=scratch)
        regime, cut, init, size, similarity, reasons = decide_by_pilots(
            ran, cut, int(data.train_examples), sizes, thresholds, config.seed)
    advice = Advice(
        backbone=config.backbone, regime=regime, cut=cut, init=init,
        pool_grid=pool_grid_for(cut), size=size, similarity=similarity, reasons=reasons,
        scores=scores,
        train_examples=int(data.train_examples),
        per_class={name: int(c) for name, c in zip(data.class_names, counts)},
        sample=len(measured.labels), thresholds=dataclasses.asdict(thresholds), notes=notes,
        seconds=round(time.time() - start, 2),
        pilots={name: {"accuracy": round(p.accuracy, 4), "seconds": round(p.seconds, 1)}
                for name, p in ran.items()},
        pilot_images=dict(sizes),
        decided_by="pilots" if ran else "scores")
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
        pilot = pilots.get(f"frozen@{cut}", {}).get("accuracy")
        lines.append(f"{cut:<{width}} {_num(pre):>8} {_num(row['random']):>8} "
                     f"{_num(row.get('gain')):>8} {_num(row.get('h_pretrained', row['h_random'])):>8} "
                     f"{_num(knn):>8}" + (f" {_num(pilot):>8}" if pilots else "") + mark)
    if pilots:
        images = advice.pilot_images
        trained = ", ".join(f"{name} {p['accuracy']:.3f} ({p['seconds']:.0f} s)"
                            for name, p in pilots.items() if not name.startswith("frozen@"))
        lines.append(f"Pilots ({images['train']} images, scored on {images['held_out']} held "
                     f"out; 'pilot' above: a frozen head there): {images['epochs']} epochs "
                     f"{trained}")
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


# --- --regime=auto: the advice, then a run of the advised regime --------------------------

AUTO = "auto"  # config.regime: the advisor decides (tl_keras.finetune, tools/finetune.py)
# Until the advisor has decided, a config with regime=auto reads this regime's config file
# and resolves as it (any regime would do: the advisor needs only the backbone and the data).
STAND_IN = "small_similar"


def config_file_regime(regime):
    """The regime whose configs/<regime>.py a config of `regime` starts from."""
    return STAND_IN if regime == AUTO else regime
ADVISED = ("cut", "init", "pool_grid")  # what the advisor decides besides the regime


def probe_config(config, given=()):
    """`config` with a placeholder regime, to resolve and load data with before the
    advisor decides; the keys it decides may not be `given` (set by the caller)."""
    taken = sorted(set(given) & set(ADVISED))
    if taken:
        raise ValueError(f"--regime=auto decides {', '.join(ADVISED)}; drop {', '.join(taken)} "
                         "or name a regime")
    from tl_keras import plan as plan_lib

    config = plan_lib.editable(config)
    config.regime = STAND_IN
    return config


def advised_plan(plan, datasets, strategy=None, given=None, verbose=0):
    """Runs the advisor on `datasets` with `plan`'s backbone, prints its table, and
    returns (the plan of the advised regime, the advisor's features to reuse as the
    first cached view or None, the `Advice`).

    `given`: the keys the caller set over a regime's config file (None: the
    config is the caller's own, e.g. `--config=FILE`). With `given`, the advised
    regime's own config file is read and takes those keys from `plan`; else
    `plan`'s config is kept. Either way `config.advice` records the decision.
    """
    import importlib

    import ml_collections

    from tl_keras import plan as plan_lib

    config = plan_lib.editable(plan.config)
    knobs = config.advisor
    print(f"Regime advisor: scoring {config.backbone} at every cut on up to "
          f"{knobs.sample} training images, pretrained and at random init")
    advice, sample = advise(plan, datasets, sample=knobs.sample,
                            thresholds=Thresholds.from_config(knobs), verbose=verbose,
                            pilots=PilotSettings.from_config(knobs))
    print(format_table(advice))
    if given is not None:  # the advised regime's own defaults, then the caller's
        final = importlib.import_module(f"tl_keras.configs.{advice.regime}").get_config()
        for key in given:
            final[key] = config[key]
        final.workdir = config.workdir
    else:
        final = config
    final.update(advice.config_overrides())
    final.advice = ml_collections.ConfigDict(advice.decision())
    plan = plan_lib.resolve(final)
    key = f"pretrained/{advice.cut}"
    reusable = (sample.whole_view and key in sample.features and strategy is None
                and not plan.config.mixed_precision.startswith("mixed"))
    return plan, ((sample.features[key], sample.labels) if reusable else None), advice
