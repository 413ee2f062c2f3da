"""tl_keras: transfer learning for Keras in four regimes.

Modules, in the order data flows:
    arrays      built-in datasets and the seeded split as numpy arrays (no TensorFlow)
    data        tf.data pipelines from folders, TFDS, built-in datasets, arrays
    backbones   Keras Applications backbones (and efficientnet_lite, read from
                torch_state_dict files), their preprocessing, named cut points
    model       raw pixels -> preprocessing -> cut backbone -> new Dense head
    features    cached backbone features for training a head on a frozen backbone
    trainable   the regimes as data; the one function that applies them
    train       phases with model.fit; the run folder
    export      a finished model as a SavedModel for TF Serving
"""

__version__ = "0.1.0"
