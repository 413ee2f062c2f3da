"""The regime table's own example network: three convolutional and three fully connected layers.

The regime description explains transfer with one small network: the first
convolution detects edges, the second shapes, the third higher-level
features; then three fully connected layers, the last the classifier. Small
enough to pretrain here in a minute (tools/study.py does, on Fashion-MNIST
classes 0-4), so the rule of the table can be tested on the network it
describes.

    images [N, S, S, 3], 0-255 (preprocess_input: / 255)
      conv1       Conv2D 16, 3x3, ReLU     edges
      conv1_pool  MaxPool 2x2              <- cut "conv1" (= "early")
      conv2       Conv2D 32, 3x3, ReLU     shapes
      conv2_pool  MaxPool 2x2              <- cut "conv2" (= "middle")
      conv3       Conv2D 32, 3x3, ReLU     higher-level features
      conv3_pool  MaxPool 2x2              <- cut "conv3" (= "late")
      flatten
      fc1         Dense 256, ReLU          <- cut "fc1"
      fc2         Dense 128, ReLU          <- cut "fc2" (= "top": include_top=False ends here)
      predictions Dense(classes)           the classifier a new head replaces

The fully connected layers see the flattened map, so a model (and its
weights) fits one image size; the default is 32 px (the study: 28). About
1.7 million multiply-adds per 28 px image: a forward pass over 30,000 images
takes seconds on 2 CPU cores.

Example:
    base = SeedCNN(include_top=False, weights=None, input_shape=(32, 32, 3))
"""

import keras
from keras import layers

IMAGE_SIZE = 32
CUTS = {"conv1": "conv1_pool", "conv2": "conv2_pool", "conv3": "conv3_pool",
        "fc1": "fc1", "fc2": "fc2"}
CUT_POINTS = {"early": "conv1_pool", "middle": "conv2_pool", "late": "conv3_pool", "top": "fc2"}


def preprocess_input(x, data_format=None):
    """Pixels 0-255 -> 0-1."""
    return x / 255.0


def SeedCNN(include_top=True, weights=None, input_shape=None, classes=1000,
            classifier_activation="softmax", name="seed_cnn"):
    """The network, in the signature of `keras.applications` constructors.

    Args:
      include_top: end with the `predictions` classifier, else at `fc2`.
      weights: None, or the path of a `.weights.h5` file saved from a
        `SeedCNN` with the same `include_top` and input size.
      input_shape: (size, size, 3); default (32, 32, 3).
      classes: outputs of the classifier.
    """
    if weights == "imagenet":
        raise ValueError("seed_cnn has no ImageNet weights: use --weights=none or the "
                         ".weights.h5 file tools/study.py pretrains")
    inputs = keras.Input(input_shape or (IMAGE_SIZE, IMAGE_SIZE, 3), name="input_layer")
    x = inputs
    for i, filters in enumerate((16, 32, 32), start=1):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{i}")(x)
        x = layers.MaxPooling2D(2, name=f"conv{i}_pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(256, activation="relu", name="fc1")(x)
    x = layers.Dense(128, activation="relu", name="fc2")(x)
    if include_top:
        x = layers.Dense(classes, activation=classifier_activation, name="predictions")(x)
    model = keras.Model(inputs, x, name=name)
    if weights is not None:
        model.load_weights(weights)
    return model
