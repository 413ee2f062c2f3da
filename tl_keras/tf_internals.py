"""Every private TensorFlow API tl_keras relies on, in one place.

As keras_internals.py does for Keras (this module is apart because that one
must import no TensorFlow): each is checked against the TensorFlow version
tl_keras was tested with, and on another one fails with a one-line
`RuntimeError` that names the version to install.

    frozen_graph_def(function)    convert_to_constants: variables as constants

Example:
    graph_def = tf_internals.frozen_graph_def(traced.get_concrete_function(spec))
"""

from tl_keras.keras_internals import check_version


def _tensorflow(what):
    import tensorflow as tf

    check_version("tensorflow", tf.__version__, what)


def frozen_graph_def(function):
    """The GraphDef of `function` (a `ConcreteFunction`) with every variable it
    reads replaced by a constant of its value, control flow lowered.

    This is the first half of `convert_variables_to_constants_v2`, the function
    TensorFlow's own freezing uses. Its second half wraps the GraphDef into a
    new function by pruning it (0.7 s for EfficientNet-Lite0); `folded.fold`
    imports it into a function of its one input instead (0.2 s).
    """
    _tensorflow("convert_to_constants._replace_variables_by_constants")
    from tensorflow.python.framework import convert_to_constants

    graph_def, _ = convert_to_constants._replace_variables_by_constants(
        converter_data=convert_to_constants._FunctionConverterDataInEager(
            func=function, lower_control_flow=True, aggressive_inlining=False))
    return graph_def
