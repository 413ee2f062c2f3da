"""Every default of a tl_keras run, one line each. Regime configs override a few.

Run:
    python tools/finetune.py --config=configs/base.py --config.dataset=PATH
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config():
    config = ml_collections.ConfigDict()

    # --- What to train (see tl_keras/trainable.py for the regimes) ---
    config.task = "single_label"         # single_label: one class per image | multi_label: several, from a label table (tl_keras/tasks.py)
    config.regime = "small_similar"      # small_similar | small_different | large_similar | large_different | auto (the advisor)
    config.backbone = "efficientnet_lite0"  # a key of tl_keras.backbones.BACKBONES, or hub:PRESET (a KerasHub preset or folder)
    config.weights = "imagenet"          # imagenet | none | PATH.weights.h5 (efficientnet_lite*: offline)
    config.init = "pretrained"           # pretrained | scratch (large regimes: every weight random)
    config.cut = placeholder(str)        # early | middle | late | top | a layer name; None: the regime's
    config.image_size = 96               # 0: the backbone's default (224-384 px; slow on a CPU)
    config.pool_grid = 1                 # head input: 1 global average; g: a g x g grid of averages
    config.token_pool = "cls_mean"       # a transformer's tokens: cls | mean (of the patch tokens) | cls_mean (both)
    config.dropout = 0.2                 # before the new head

    # --- Data (see tl_keras/data.py) ---
    config.dataset = "fashion_mnist"     # a folder of class subfolders | a .csv/.tsv label table | tfds:NAME | fashion_mnist | digits
    config.table = ml_collections.ConfigDict()  # a label table's columns (tl_keras/tables.py; docs/data.md)
    config.table.path_column = ""        # image paths, relative to the table's folder; "": the first column
    config.table.label_column = ""       # one label per image; "": the second column
    config.table.split_column = "split"  # train | valid per row, when the table has this column; else held out by seed
    config.table.label_delimiter = "auto"  # auto: | ; or a space in a cell separates labels (task=multi_label; a single-label run refuses them); none: each cell is one label
    config.val_fraction = 0.2            # held out by seed when the source has no validation split
    config.max_examples = 0              # cap on training examples (seeded subset); 0: all
    config.examples_per_class = 0        # cap on training examples per class (seeded); 0: all
    config.strict = False                # fail on an undecodable image instead of skipping it
    config.train_split = "train"         # TFDS split, slicing allowed ("train[:10%]")
    config.val_split = ""                # TFDS split; "": validation, else test, else carved from train
    config.tfds_data_dir = ""            # TFDS data directory; "": TFDS' default
    config.image_cache_bytes = 2 << 30   # cache the resized images in memory up to this size
    config.augment = True                # training-side augmentation on/off
    config.augment_flip = "horizontal"   # horizontal | vertical | horizontal_and_vertical | none
    config.augment_zoom = 0.1            # RandomZoom factor; 0: off
    config.augment_rotation = 0.05       # RandomRotation factor (fraction of a turn); 0: off
    config.rand_augment = 0              # RandAugment: ops per training batch (Keras' layer, seeded per batch); 0: off
    config.rand_augment_magnitude = 0.5  # RandAugment's factor: strength of each op, 0-1

    # --- Training ---
    config.epochs = 10                   # total, across phases
    config.head_epochs = 2               # large regimes: head-only epochs before unfreezing
    config.batch_size = 32
    config.cache_features = True         # frozen backbone: compute its features once, train the head on them
    config.cached_views = 2              # augmented views cached per training image (1 without augmentation)
    config.feature_cache_bytes = 2 << 30  # cached features in memory up to this size, else .npy files in the run folder
    config.inference_batch_size = 256    # images per forward pass that trains nothing (cached features); 0: batch_size
    config.folded_inference = True       # TensorFlow on a CPU: such passes run as one constant-folded graph (tl_keras/folded.py)
    config.head_steps_per_execution = 32  # head on cached features: training steps per call into the backend; 1: Keras' default
    config.learning_rate = 1e-3          # head phase (and init=scratch)
    config.finetune_learning_rate = 3e-4  # large regimes, phase 2: everything trains (the schedule's peak)
    config.unfreeze = 0                  # large regimes, phase 2: train only the top k stages of the backbone; 0: all
    config.label_smoothing = 0.0         # cross-entropy against labels smoothed by this much
    config.class_weight = "none"         # none | balanced: each class's loss weighted by n / (classes x its images); multi_label: each label's positives by images without / with it
    config.scratch_batchnorm_momentum = 0.9  # init=scratch: BatchNorm momentum (Keras Applications: 0.99-0.999)
    config.weight_decay = 1e-4           # decoupled weight decay (AdamW's; SGD's too)

    # --- How phases that train the backbone train (large regimes; tl_keras/recipe.py) ---
    # Defaults chosen by measurement: docs/quality.md (benchmarks/recipes.py).
    config.optimizer = "adamw"           # adamw | sgd (momentum 0.9)
    config.schedule = "cosine"           # constant | cosine (to 0) | steps (BiT: / 10 at 30%, 60%, 90%) | size_rule (BiT's HyperRule: steps, warm-up, mixup from the data's size)
    config.warmup = 0.1                  # fraction of the phase's steps warming the rate up linearly from 0
    config.clipnorm = 1.0                # clip gradients to this global norm; 0: off
    config.layer_decay = 1.0             # backbone stage k below the top trains at rate x layer_decay^k; 1: one rate
    config.ema = 0.0                     # validate, save and keep an average of the weights with this momentum; 0: off
    config.early_stopping = 0            # stop after this many epochs without a better val_accuracy, best weights back; 0: off
    config.batch_augment = "none"        # none | mixup | cutmix: training batches mixed with themselves, labels too
    config.mix_alpha = 0.2               # mixup / CutMix: lambda drawn from Beta(mix_alpha, mix_alpha)
    config.accumulate = 1                # gradients of this many batches per optimizer update (a larger batch in the same memory); the schedule counts updates
    config.lora_rank = 0                 # LoRA adapters of this rank train instead of the backbone's weights (merged into every saved model); 0: off
    config.mixed_precision = ""          # "" (float32) | mixed_float16 | mixed_bfloat16
    config.jit_compile = False           # XLA
    config.distribution = "auto"         # auto | none | mirrored | multi_worker | tpu (tl_keras/distribute.py)
    config.peer_timeout = 300            # multi_worker: seconds a starting or restarted worker waits for the others
    config.validation_freq = 1           # validate every N epochs (counted across phases); final metrics always
    config.report = True                 # a finished run draws curves.png, regime.png, report.html (report.py)
    config.seed = 0
    config.verbose = "auto"              # Keras fit verbosity: auto (bar on a terminal) | 0 | 1 | 2

    # --- The regime advisor (--regime=auto, tools/advise.py; advise.py, pilots.py; docs/advisor.md) ---
    config.advisor = ml_collections.ConfigDict()
    config.advisor.sample = 2000         # training images scored (seeded: the pipeline's first read)
    config.advisor.large_examples = 10_000  # training images from which a dataset is "large"
    config.advisor.similar_margin = 0.02  # top cut's LogME within this of the best cut: "similar"
    config.advisor.scratch_margin = 0.1  # large data, pretraining adds less LogME than this: init=scratch
    config.advisor.pilots = True         # short real runs on the sample decide (frozen heads, fine-tuned, scratch); False: the scores alone
    config.advisor.pilot_passes = 2.0    # the fine-tuned pilot (and on large data the from-scratch one) trains on this many training sets' worth of images
    config.advisor.pilot_epochs = 10     # ... at most this many epochs of their pilot-train images
    config.advisor.pilot_held_out = 0.3  # of the sample, held out (stratified, seeded) to score the pilots on
    config.advisor.costlier_margin = 0.005  # a pilot that trains more than the table's choice (fine-tuned or scratch over a frozen head) must beat it by this at its 95% lower bound: a tie goes to the cheaper
    config.advisor.scratch_pilot = "large"  # a from-scratch pilot too: large (on large data) | always | never

    # --- Where ---
    config.workdir = ""                  # "": runs/<regime>_<backbone>_<time>
    return config
