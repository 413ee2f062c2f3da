"""Augmentation of training batches, seeded: flips, zoom and rotation, RandAugment
(`Augmentation`), and mixup or CutMix (`Mix`). Each batch draws its own seed, so a
run with the same config and seed sees the same batches.

    batches --augment_batches--> augmented batches (train only; data.py's pipeline)
    batches --mix_batches------> mixed images, mixed one-hot labels (train.py, a phase's recipe)

Example:
    train = augment_batches(train, augmentation(config), config.seed)
"""

import dataclasses
import math

import tensorflow as tf

RAND_AUGMENT_STREAM = 7  # Augmentation: RandAugment's seed, folded from the batch's


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Random flips, zooms, rotations (and RandAugment) of a batch, drawn from a seed alone.

    The same batch and seed give the same images, in any thread: the ops are
    stateless (`tf.image.stateless_random_*`, `tf.random.stateless_uniform`),
    unlike Keras' RandomFlip / RandomZoom / RandomRotation, whose shared
    SeedGenerator a parallel `map` draws from in a varying order (the same
    command then gave 0.818-0.827). `make_datasets` gives each batch its seed
    from a seeded stream that changes each epoch, so each epoch (and each cached
    view) is augmented anew, the same way in every run of the same config.

    As Keras' layers: a zoom factor z scales by 1 +- z (in or out), a rotation
    factor r turns by up to r of a full turn either way, both about the centre,
    bilinear, the edges reflected. Then, when given, Keras' RandAugment, its draws
    taken from the batch's seed too (keras_internals.seeded_rand_augment).
    """

    flip: str          # horizontal | vertical | horizontal_and_vertical | none
    zoom: float        # fraction of the size; 0: off
    rotation: float    # fraction of a full turn; 0: off
    rand_augment: object = None  # keras_internals.seeded_rand_augment(...), or None

    def __call__(self, images, seed):
        """`images` [B, H, W, C] (any real dtype) augmented, float32; `seed`: int64 [2]."""
        images = tf.cast(images, tf.float32)
        seeds = tf.random.experimental.stateless_split(seed, 4)
        if self.flip in ("horizontal", "horizontal_and_vertical"):
            images = tf.image.stateless_random_flip_left_right(images, seeds[0])
        if self.flip in ("vertical", "horizontal_and_vertical"):
            images = tf.image.stateless_random_flip_up_down(images, seeds[1])
        if self.zoom or self.rotation:
            images = self._zoom_and_rotate(images, seeds[2], seeds[3])
        if self.rand_augment is not None:  # its own seed: the streams above stay as they were
            images = self._rand_augment(images, tf.random.experimental.stateless_fold_in(
                seed, RAND_AUGMENT_STREAM))
        return images

    def _rand_augment(self, images, seed):
        """RandAugment of 0-255 images. Its colour ops need RGB: grey (with or without
        alpha) goes through as RGB and comes back grey; alpha is left as it was."""
        channels = images.shape[-1]
        if channels == 3:
            return self.rand_augment.augment(images, seed)
        if channels in (1, 2):
            grey = self.rand_augment.augment(tf.concat([images[..., :1]] * 3, -1), seed)
            return tf.concat([grey[..., :1], images[..., 1:]], -1)
        return tf.concat([self.rand_augment.augment(images[..., :3], seed), images[..., 3:]], -1)

    def _zoom_and_rotate(self, images, zoom_seed, angle_seed):
        batch = tf.shape(images)[0]
        scale = tf.random.stateless_uniform([batch], zoom_seed, 1 - self.zoom, 1 + self.zoom)
        turn = 2 * math.pi * self.rotation
        return zoom_and_rotate(images, scale,
                               tf.random.stateless_uniform([batch], angle_seed, -turn, turn))


def zoom_and_rotate(images, scale, angle):
    """`images` [B, H, W, C] float32, each scaled by `scale` [B] (> 1: zoomed out) and
    turned by `angle` [B] (radians) about its centre; bilinear, the edges reflected."""
    shape = tf.shape(images)
    height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    # Output pixel (x, y) reads the input at centre + scale * R(angle) (xy - centre).
    cx, cy = (width - 1) / 2, (height - 1) / 2
    cos, sin = scale * tf.cos(angle), scale * tf.sin(angle)
    zeros = tf.zeros_like(cos)
    transforms = tf.stack([cos, -sin, cx - cos * cx + sin * cy,
                           sin, cos, cy - sin * cx - cos * cy, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=shape[1:3],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT")


def augmentation(config):
    """The training side's `Augmentation`, or None when it is off.

    `augment_flip`: "horizontal", "vertical", "horizontal_and_vertical" or "none";
    `augment_zoom`, `augment_rotation`: factors (fraction of size / of a full turn), 0 = off;
    `rand_augment`: RandAugment's ops per batch (Keras' layer, drawn from the batch's
    seed: keras_internals.seeded_rand_augment), 0 = off, at `rand_augment_magnitude`.
    """
    if not config.augment:
        return None
    flip = config.augment_flip or "none"
    if (flip == "none" and not config.augment_zoom and not config.augment_rotation
            and not config.rand_augment):
        return None
    rand_augment = None
    if config.rand_augment:
        from tl_keras import keras_internals

        rand_augment = keras_internals.seeded_rand_augment(
            value_range=(0, 255), num_ops=int(config.rand_augment),
            factor=float(config.rand_augment_magnitude), seed=int(config.seed))
    return Augmentation(flip, float(config.augment_zoom), float(config.augment_rotation),
                        rand_augment)


def augment_batches(ds, augment, seed):
    """`ds` of (images, labels) batches augmented in parallel, each batch by its own
    seed: (`seed`, a draw of a stream seeded by `seed` that is drawn anew each time
    `ds` is read), so the same in every run and different in each epoch."""
    draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    ds = tf.data.Dataset.zip(ds, draws)
    return ds.map(lambda batch, draw: (augment(batch[0], tf.stack([tf.constant(seed, tf.int64),
                                                                   draw])), batch[1]),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


@dataclasses.dataclass(frozen=True)
class Mix:
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) of a batch with itself
    shuffled, the labels mixed in the same proportion: one lambda per batch from
    Beta(alpha, alpha), drawn from a seed alone (stateless ops, as `Augmentation`).
    CutMix pastes a box covering 1 - lambda of the image from the shuffled batch,
    and mixes the labels by the box's area as cut (clipped at the edges)."""

    kind: str       # mixup | cutmix
    alpha: float    # Beta(alpha, alpha)
    num_classes: int

    def __call__(self, images, labels, seed):
        """(images float32, labels [B, num_classes] float32) mixed; `seed`: int64 [2]."""
        images = tf.cast(images, tf.float32)
        labels = tf.convert_to_tensor(labels)
        if labels.shape.rank == 2:  # 0/1 vectors (several labels per image): mixed as they are
            labels = tf.cast(labels, tf.float32)
        else:
            labels = tf.one_hot(tf.cast(tf.reshape(labels, [-1]), tf.int32), self.num_classes)
        seeds = tf.random.experimental.stateless_split(seed, 4)
        size = tf.shape(images)[0]
        order = tf.argsort(tf.random.stateless_uniform([size], seeds[0]))
        a = tf.random.stateless_gamma([], seeds[1], alpha=self.alpha)
        b = tf.random.stateless_gamma([], seeds[2], alpha=self.alpha)
        lam = a / (a + b)
        if self.kind == "mixup":
            images = lam * images + (1 - lam) * tf.gather(images, order)
        else:
            inside, lam = _box(tf.shape(images)[1], tf.shape(images)[2], 1 - lam, seeds[3])
            images = tf.where(inside[None, :, :, None], tf.gather(images, order), images)
        return images, lam * labels + (1 - lam) * tf.gather(labels, order)


def _box(height, width, area, seed):
    """A [height, width] mask of a box covering `area` of the image at a random centre
    (clipped at the edges), and 1 - the area it covers after clipping."""
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    cy, cx = tf.unstack(tf.random.stateless_uniform([2], seed) * tf.stack([h, w]))
    half_h, half_w = h * tf.sqrt(area) / 2, w * tf.sqrt(area) / 2
    rows = tf.range(h)[:, None] + 0.5
    cols = tf.range(w)[None, :] + 0.5
    inside = ((rows >= cy - half_h) & (rows < cy + half_h)
              & (cols >= cx - half_w) & (cols < cx + half_w))
    return inside, 1 - tf.reduce_mean(tf.cast(inside, tf.float32))


def mix_batches(ds, mix, seed):
    """`ds` of (images, labels) batches mixed by `mix` (a `Mix`), each batch by its own
    seed drawn as `augment_batches` draws them (another stream: `seed` + 1)."""
    draws = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True)
    ds = tf.data.Dataset.zip(ds, draws)
    return ds.map(lambda batch, draw: mix(batch[0], batch[1], tf.stack(
        [tf.constant(seed, tf.int64), draw])), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
