"""What every run needs, made one way: the plan, the strategy, the data and, with
`--regime=auto`, the advice. `tl_keras.finetune`, `advise_regime` and tools/tune.py
all start with `prepare`; none of them knows how `auto` is carried out.

    config --resolve--> plan --> strategy --> your checks --> data
          (regime=auto: each backbone advised on its data, the best one's advised
           regime resolved once) --> Prepared(plan, strategy, datasets, advice, first_view)

Until the advisor has decided, a config of regime `auto` is read from, and resolves
as, the stand-in regime's file (`STAND_IN`): the advisor needs only the backbone and
the data. Then the advised regime's own file is read, with the keys the caller set
over it (`given`).

Example:
    prepared = prepare(config, given, on_plan=check_folder)
    prepared.plan.regime, prepared.datasets.train_examples, prepared.advice
"""

import dataclasses
import importlib

import ml_collections

import tl_keras
from tl_keras import advise, backbones, plan as plan_lib, trainable

AUTO = "auto"  # config.regime: the advisor decides
REGIMES = (*trainable.REGIMES, AUTO)
# Any regime would do as the stand-in: the advisor reads only the backbone and the data.
STAND_IN = "small_similar"
ADVISED = ("cut", "init", "pool_grid")  # what the advisor decides besides the regime


def config_file_regime(regime):
    """The regime whose configs/<regime>.py a config of `regime` starts from."""
    check_regime(regime)
    return STAND_IN if regime == AUTO else regime


def check_regime(regime):
    """A one-line `ValueError` for a regime that is neither one of the four nor auto."""
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; valid regimes: {', '.join(REGIMES)}")


@dataclasses.dataclass
class Prepared:
    """What a run needs: `plan` (regime=auto: the advised one; None for the advice
    alone), the tf.distribute `strategy` (None: one device), the data, and, with
    regime=auto, the `advise.Advice` and the advisor's features to reuse as the
    first cached view (or None)."""

    plan: object
    strategy: object
    datasets: object
    advice: object = None
    first_view: object = None


def prepare(config, given=None, *, on_plan=None, before_data=None, cuts=None,
            decide=True):
    """Resolves `config`, makes its strategy, loads its data and, with regime=auto,
    advises on it; returns `Prepared`.

    Args:
      config: a ConfigDict (`api.make_config`, tools/_common.flags_config). Its
        regime `auto` advises on each backbone of `backbone="a,b,c"` and runs the best.
      given: the config keys the caller set over a regime's config file, or None
        when the config is the caller's own (`--config=FILE`): see module doc.
      on_plan: `on_plan(plan, strategy)`, called once with the plan that runs as
        soon as it is known: before the data for a named regime, after the advice
        with auto. The caller's checks of it (a run folder, a sweep).
      before_data: `before_data(plan, strategy)`, called once before any data is read
        (with auto, `plan` is the stand-in's): checks that need no decided regime.
      cuts: the cuts the advisor scores (default: the backbone's named ones).
      decide: False for the advice alone (tools/advise.py): no plan is made from it.
    """
    auto = not decide or config.regime == AUTO
    names = advise.backbone_names(config.backbone) if auto else [config.backbone]
    if auto:
        config = _stand_in(config, given or ())
        config.backbone = names[0]
    plan = plan_lib.resolve(config)
    if not auto:
        plan_lib.refuse_unused_recipe(plan)
    strategy = make_strategy(plan)  # before any other TensorFlow work
    if on_plan and not auto:
        on_plan(plan, strategy)
    if before_data:
        before_data(plan, strategy)
    datasets = load_data(plan, strategy)
    if not auto:
        return Prepared(plan, strategy, datasets)
    advice, sample, datasets, plan = _advise_each(config, names, plan, datasets, strategy, cuts)
    if not decide:
        return Prepared(None, strategy, datasets, advice)
    plan = _advised_plan(plan, advice, given)
    unused = plan_lib.unused_recipe(plan)
    if unused:
        print(f"Note: {unused}: not used.")
    if on_plan:
        on_plan(plan, strategy)
    return Prepared(plan, strategy, datasets, advice, _first_view(plan, advice, sample, strategy))


def make_strategy(plan):
    """The tf.distribute strategy `plan.distribution` names (None: one device), announced."""
    from tl_keras import distribute

    strategy = distribute.get_strategy(plan.distribution, plan.config.peer_timeout)
    if strategy is not None:
        print(f"Distribution: {distribute.name_of(strategy)}, "
              f"{distribute.replicas(strategy)} replicas, global batch "
              f"{distribute.global_batch(plan.config, strategy)} "
              f"({plan.config.batch_size} per replica)")
    return strategy


def load_data(plan, strategy=None):
    """`data.load` at the strategy's global batch, announced; the backbone's cut
    and weights are checked first, as reading a real dataset takes minutes."""
    from tl_keras import data, distribute

    config = plan.config
    backbones.check_buildable(config.backbone, plan.weights, plan.image_size, plan.cut)
    datasets = data.load(config, image_size=plan.image_size,
                         batch_size=distribute.global_batch(config, strategy),
                         drop_remainder=distribute.replicas(strategy) > 1)
    print(f"Data: {datasets.train_examples} training and {datasets.val_examples} "
          f"validation images, {len(datasets.class_names)} classes, {config.image_size}px")
    return datasets


# --- regime=auto ---------------------------------------------------------------------------

def _stand_in(config, given):
    """`config` as the stand-in regime, to resolve and load data with before the advisor
    decides; the keys it decides may not be `given`."""
    taken = sorted(set(given) & set(ADVISED))
    if taken:
        raise ValueError(f"--regime=auto decides {', '.join(ADVISED)}; drop {', '.join(taken)} "
                         "or name a regime")
    config = plan_lib.editable(config)
    config.regime = STAND_IN
    return config


def _advise_each(config, names, plan, datasets, strategy, cuts):
    """The advisor on each backbone in `names` (`plan` and `datasets` are the first's);
    returns the best one's (`Advice`, its `advise.Sample`, its datasets, its stand-in
    plan). Data is read once per image size."""
    from tl_keras import pilots as pilots_lib

    results, loaded = [], {plan.image_size: datasets}
    for i, name in enumerate(names):
        if len(names) > 1:
            print(f"Backbone {i + 1}/{len(names)}: {name}")
        if i:
            config.backbone = name
            plan = plan_lib.resolve(config)  # image_size 0: this backbone's own
        if plan.image_size not in loaded:
            loaded[plan.image_size] = load_data(plan, strategy)
        knobs = plan.config.advisor
        print(f"Regime advisor: scoring {name} at every cut on up to {knobs.sample} "
              "training images, pretrained and at random init")
        advice, sample = pilots_lib.advise(
            plan, loaded[plan.image_size], sample=knobs.sample,
            cuts=tuple(cuts or backbones.CUT_POINTS),
            thresholds=advise.Thresholds.from_config(knobs),
            verbose=int(tl_keras.interactive()),
            pilots=pilots_lib.PilotSettings.from_config(knobs))
        print(advise.format_table(advice))
        results.append((advice, sample, loaded[plan.image_size], plan))
    if len(results) == 1:
        return results[0]
    best = advise.choose_backbone([result[0] for result in results])
    print(advise.format_backbones(best))
    _, sample, datasets, plan = results[[r[0].backbone for r in results].index(best.backbone)]
    return best, sample, datasets, plan


def _advised_plan(plan, advice, given):
    """The plan of the advised regime, from the advised backbone's stand-in `plan`: with
    `given`, the regime's own config file with those keys taken from `plan`; else
    `plan`'s config. `config.advice` records the decision."""
    config = plan_lib.editable(plan.config)
    if given is not None:  # the advised regime's own defaults, then the caller's
        final = importlib.import_module(f"tl_keras.configs.{advice.regime}").get_config()
        for key in given:
            final[key] = config[key]
        final.workdir = config.workdir
    else:
        final = config
    final.update(advice.config_overrides())
    final.advice = ml_collections.ConfigDict(advice.decision())
    return plan_lib.resolve(final)


def _first_view(plan, advice, sample, strategy):
    """The advisor's features at the advised cut, when the sample is the whole training
    set and the run can take them as its first cached view: (features, labels) or None."""
    key = f"pretrained/{advice.cut}"
    if (sample.whole_view and key in sample.features and strategy is None
            and not plan.config.mixed_precision.startswith("mixed")):
        return sample.features[key], sample.labels
    return None
