"""Run: python benchmarks/augmentation_speed.py (prints the median seconds per pass).

Augmented training pipeline of the README's main job (2,000 Fashion-MNIST images at 96 px):
Keras' stateful layers (before) against augment.Augmentation (now), passes alternated."""
import time, numpy as np, tensorflow as tf, keras
from tl_keras import data
from tl_keras.configs import small_similar
c = small_similar.get_config(); c.max_examples = 2000
d = data.load(c, image_size=96)
ex = data.load_examples(c)
layers = keras.Sequential([keras.layers.RandomFlip("horizontal", seed=0), keras.layers.RandomZoom(0.1, seed=0), keras.layers.RandomRotation(0.05, seed=0)])
def old_pipeline():
    ds = ex.train.map(lambda x, y: (tf.cast(data.resize(x, (96, 96)), tf.uint8), y), num_parallel_calls=tf.data.AUTOTUNE).cache()
    ds = ds.shuffle(2000, seed=0).batch(32).map(lambda x, y: (layers(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
old, new = old_pipeline(), d.train
for ds in (old, new):  # fill the caches
    for _ in ds: pass
times = {"keras layers": [], "stateless": []}
for _ in range(4):
    for name, ds in (("keras layers", old), ("stateless", new)):
        t = time.perf_counter()
        for _ in ds: pass
        times[name].append(time.perf_counter() - t)
for k, v in times.items(): print(k, "median s per pass of 2000 images:", round(float(np.median(v)), 3), [round(x, 3) for x in v])
