"""Every private TensorFlow API tl_keras relies on, in one place.

As keras_internals.py does for Keras (this module is apart because that one
must import no TensorFlow): each is checked against the TensorFlow version
tl_keras was tested with, and on another one fails with a one-line
`RuntimeError` that names the version to install.

    frozen_graph_def(function)    convert_to_constants: variables as constants
    configure_coordination(timeout)  the multi-worker coordination service, with a
                                  timeout on the wait for every worker

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


def configure_coordination(timeout_s):
    """Configures the coordination service as `MultiWorkerMirroredStrategy` does
    (`CollectiveAllReduceExtended._initialize_multi_worker`, which keeps a
    service configured already), with one change: every worker's registration
    waits at a barrier for all of them, `timeout_s` at most, then raises
    `DeadlineExceededError`. Without the barrier the service's leader waits
    for the others forever. Call it before the strategy is made.
    """
    _tensorflow("context.configure_coordination_service")
    import tensorflow as tf
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    cluster = tf.distribute.cluster_resolver.TFConfigClusterResolver().cluster_spec()
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=multi_worker_util.coordination_leader(cluster),
        coordinated_jobs=[coordination_config_pb2.CoordinatedJob(
            name=job, num_tasks=cluster.num_tasks(job))
            for job in ("chief", "worker") if job in cluster.jobs],
        cluster_register_timeout_in_ms=int(timeout_s * 1000))
    context.context().coordination_service.cluster_register_with_barrier = True
