"""tl_keras: transfer learning for Keras in four regimes.

Modules, in the order data flows:
    data        tf.data pipelines from folders, TFDS, built-in datasets, arrays
    backbones   Keras Applications backbones, their preprocessing, named cut points
    model       raw pixels -> preprocessing -> cut backbone -> new Dense head
    trainable   the regimes as data; the one function that applies them
    train       phases with model.fit; the run folder
"""

__version__ = "0.1.0"
