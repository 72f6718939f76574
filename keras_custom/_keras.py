"""The one module that touches Keras and TensorFlow internals.

Everything else in `keras_custom` uses Keras's public API only. Each entry here says
what it is for, why no public API does it, and on which Keras versions it was
checked. `KERAS_VERSION` is the installed one; the package supports 3.12 to 3.15
(`pyproject.toml`), and the test suite runs on the oldest and the newest of them.

Nothing here imports TensorFlow unless Keras runs on it: a JAX or PyTorch user does
not need TensorFlow installed.
"""

import contextlib
import functools

import keras

KERAS_VERSION = tuple(int(p) for p in keras.version().split(".")[:2])
BACKEND = keras.backend.backend()

# ---------------------------------------------------------------------------------
# Model classes. Checked on Keras 3.12-3.15.
# ---------------------------------------------------------------------------------

# The class that `keras.Model(inputs, outputs)` builds. Not exported by Keras, but
# `kc.Model(inputs, outputs)` must build the same thing (with our step), and a
# `.keras` file names it.
from keras.src.models.functional import Functional  # noqa: E402,F401

# The backend's Keras trainer (`JAXTrainer`, ...): `keras.Model.__init__` runs its
# `__init__` before `Functional.__init__`, and so must `kc.Model.__init__`.
from keras.src.models.model import Trainer as KerasBackendTrainer  # noqa: E402,F401

# How `keras.Model.__init__` tells a functional call (`Model(inputs, outputs)`) from
# a subclass's call; we must route the same calls the same way.
from keras.src.models.model import functional_init_arguments  # noqa: E402,F401

# The base class of everything Keras's saver walks into (layers, optimizers,
# metrics, losses). Hooks derive from it so that their state is saved with the
# model. `_obj_type` picks which attributes the saver skips; a hook is closest to a
# "Loss" (one of the fixed kinds Keras knows).
from keras.src.saving.keras_saveable import KerasSaveable  # noqa: E402,F401

SAVEABLE_TYPE = "Loss"

# ---------------------------------------------------------------------------------
# Losses under a tf.distribute strategy. Checked on Keras 3.12-3.15.
# ---------------------------------------------------------------------------------

# Keras divides each replica's loss by the number of replicas inside `compute_loss`
# (so that gradients summed over replicas are the global batch's); hook loss terms
# must be scaled the same way, and the tracked loss unscaled. No public API.
from keras.src.losses.loss import scale_loss_for_distribution  # noqa: E402,F401
from keras.src.losses.loss import unscale_loss_for_distribution  # noqa: E402,F401

# ---------------------------------------------------------------------------------
# Private attributes of a Keras model that a train step must use, as Keras's own
# steps do. Checked on Keras 3.12-3.15.
# ---------------------------------------------------------------------------------


def loss_tracker(model):
    """The `Mean` tracker behind `loss` in the logs (Keras's steps update it)."""
    return model._loss_tracker


def call_has_training_arg(model):
    """Whether `model.call` takes `training` (Keras passes it only then)."""
    return model._call_has_training_arg


def compute_loss(model, x, y, y_pred, sample_weight, training):
    """`model.compute_loss(...)`, without `training` for an override from before
    Keras 3.3 that does not take it (what Keras's steps call)."""
    return model._compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
    )


class SymbolicBuild:
    """Runs `self._kc_after_symbolic_build()` after Keras's `_symbolic_build`.

    `fit`, `evaluate`, `train_on_batch` and `test_on_batch` call `_symbolic_build`
    before their first step (on TensorFlow only under a distribution strategy):
    the model, the compiled metrics and the optimizer are built there, outside any
    compiled function, which is where the hooks' state must be made (JAX threads
    it through the step from the first call on). Keras 3.12-3.15 have the same
    signature.
    """

    def _symbolic_build(self, *args, **kwargs):
        with self._kc_symbolic_scope():
            super()._symbolic_build(*args, **kwargs)
        self._kc_after_symbolic_build()


def all_layers(model):
    """Every layer inside `model`, nested ones included, each once (not `model`).

    `model.layers` lists only the top level: a `BatchNormalization` inside a
    custom block layer, or inside a nested model's block, is not there, and
    Keras has no public walk over sublayers. `Layer._flatten_layers` is the walk
    Keras itself uses (same signature in 3.12.0-3.15.1).
    """
    return list(model._flatten_layers(include_self=False, recursive=True))


# ---------------------------------------------------------------------------------
# Variables inside a `keras.StatelessScope`. Checked on Keras 3.12-3.15.
# ---------------------------------------------------------------------------------


@contextlib.contextmanager
def outside_stateless_scope():
    """Creates state with real values even inside a symbolic build.

    JAX and PyTorch run Keras's symbolic build in a `StatelessScope` (and, on
    PyTorch, on the "meta" device); a hook built from there must still get real
    variables. Keras offers no public way to step out of a scope.
    """
    from keras.src.backend.common import global_state

    scope = global_state.get_global_attribute("stateless_scope")
    device = global_state.get_global_attribute("torch_device", None)
    global_state.set_global_attribute("stateless_scope", None)
    if BACKEND == "torch":
        global_state.set_global_attribute("torch_device", None)
    try:
        yield
    finally:
        global_state.set_global_attribute("stateless_scope", scope)
        if BACKEND == "torch":
            global_state.set_global_attribute("torch_device", device)


def current_stateless_scope():
    """The active `keras.StatelessScope`, or `None`."""
    from keras.src.backend.common.stateless_scope import get_stateless_scope

    return get_stateless_scope()


# ---------------------------------------------------------------------------------
# Optimizers. Checked on Keras 3.12-3.15.
# ---------------------------------------------------------------------------------


def learning_rate_at(optimizer, step):
    """The learning rate `optimizer` uses at `step`, as a float32 tensor.

    The public `optimizer.learning_rate` evaluates a schedule at the optimizer's
    current `iterations`, which after an update is the next step; this reads the
    schedule itself.
    """
    from keras import ops

    opt = getattr(optimizer, "inner_optimizer", optimizer)
    lr = opt._learning_rate
    if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
        return ops.cast(lr(step), "float32")
    if callable(lr) and not isinstance(lr, keras.Variable):
        return ops.cast(lr(), "float32")
    return ops.cast(lr, "float32")


def optimizer_slots(optimizer, variable):
    """The optimizer variables that belong to `variable` (momentum, velocity, ...).

    Looks through a `LossScaleOptimizer` and a `MultiOptimizer`. A slot is an entry
    of one of the optimizer's per-variable lists (those as long as its trainable
    variables, such as Adam's `_momentums` and `_velocities`), at the variable's
    index. Keras has no public map from a variable to its slots.

    Returns:
        A list of `keras.Variable`s (empty when the optimizer is not built or
        keeps no per-variable state).
    """
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:
        return optimizer_slots(inner, variable)
    subs = getattr(optimizer, "_inner_optimizers", None)
    if subs is not None:
        return [s for sub in subs for s in optimizer_slots(sub, variable)]
    own = getattr(optimizer, "_trainable_variables", None)
    if not own:
        return []
    try:
        index = optimizer._get_variable_index(variable)
    except (KeyError, AttributeError):
        return []
    skip = {id(own), id(getattr(optimizer, "_variables", None))}
    slots = []
    for value in vars(optimizer).values():
        if id(value) in skip or not isinstance(value, (list, tuple)):
            continue
        if len(value) != len(own):
            continue
        item = value[index]
        if isinstance(item, keras.Variable) and item is not variable:
            if all(item is not s for s in slots):
                slots.append(item)
    return slots


# ---------------------------------------------------------------------------------
# Callbacks. Checked on Keras 3.12-3.15.
# ---------------------------------------------------------------------------------


def insert_callback(callbacks, index, callback):
    """Inserts `callback` at `index` in a `keras.callbacks.CallbackList` the user
    passed (a hook's callbacks go first, so that what they add to the epoch's logs
    reaches the callbacks after them).

    The callback must run in the training thread (it may raise to stop `fit`):
    Keras 3.15 may dispatch batch-end callbacks asynchronously, decided when the
    list was made (the private `_async_train`, absent before 3.15), so the list is
    told not to. Checked on Keras 3.12-3.15.
    """
    if callbacks.model is not None:
        callback.set_model(callbacks.model)
    if callbacks.params:
        callback.set_params(callbacks.params)
    callbacks.callbacks.insert(index, callback)
    if hasattr(callbacks, "_async_train"):
        callbacks._async_train = False


# ---------------------------------------------------------------------------------
# Saving and loading. Checked on Keras 3.12-3.15.
# ---------------------------------------------------------------------------------


def on_model_file(save, load, naming):
    """Lets keras_custom add its part to a `.keras` file's config, and take it back.

    A file written from a hooked model names the model's Keras class (or the
    user's own), so that it loads where keras_custom is not installed; our part
    (the hooks) is one more top-level key of `config.json`, which plain Keras
    ignores (Keras 3.12-3.15). Nothing on a model object can add a top-level key,
    and nothing can take part in loading a file whose class is not ours: Keras's
    saver turns the model into JSON in `saving_lib._serialize_model_as_json(model)`
    and back in `saving_lib._model_from_config(config_json, custom_objects,
    compile, safe_mode)`, module functions that every way of saving and loading
    a `.keras` file calls (pickling and the Orbax callback too). They are wrapped
    here: `save(model)` returns our part or `None`; `load(config, part, build)`
    builds the model, where `build(config)` is Keras's own construction; Keras's
    serializer runs inside `naming()`, while which our models name the class
    their file must name.
    """
    import json

    from keras.src.saving import saving_lib

    if getattr(saving_lib._serialize_model_as_json, "_kc_wrapped", False):
        return
    serialize = saving_lib._serialize_model_as_json
    from_config = saving_lib._model_from_config

    @functools.wraps(serialize)
    def serialize_model_as_json(model):
        with naming():
            config_json, metadata_json = serialize(model)
        part = save(model)
        if part is not None:
            config = json.loads(config_json)
            config[FILE_KEY] = part
            config_json = json.dumps(config)
        return config_json, metadata_json

    @functools.wraps(from_config)
    def model_from_config(config_json, custom_objects, compile, safe_mode):
        config = json.loads(config_json)
        part = config.pop(FILE_KEY, None) if isinstance(config, dict) else None
        if part is None:
            return from_config(config_json, custom_objects, compile, safe_mode)

        def build(config):
            return from_config(json.dumps(config), custom_objects, compile, safe_mode)

        return load(config, part, build, custom_objects, safe_mode)

    serialize_model_as_json._kc_wrapped = True
    saving_lib._serialize_model_as_json = serialize_model_as_json
    saving_lib._model_from_config = model_from_config


FILE_KEY = "keras_custom"


def public_optimizers(config):
    """Names optimizers in a compile config by their public class.

    Under PyTorch, `keras.optimizers.Adam` is `keras.src.backend.torch.optimizers.
    torch_adam.Adam`, and Keras writes that module into the compile config: the
    file would then load the PyTorch class under TensorFlow or JAX and fail in the
    first step. The public name (`keras.optimizers`) resolves to the loading
    backend's class.
    """
    if isinstance(config, dict):
        module = config.get("module")
        if (
            isinstance(module, str)
            and module.startswith("keras.src.backend.")
            and ".optimizers" in module
        ):
            config = dict(config, module="keras.optimizers")
        return {key: public_optimizers(value) for key, value in config.items()}
    if isinstance(config, list):
        return [public_optimizers(value) for value in config]
    return config


# ---------------------------------------------------------------------------------
# JAX: the stateless step's state. Checked on Keras 3.12-3.15.
# ---------------------------------------------------------------------------------


class JAXState:
    """Threads the hooks' state through Keras's stateless JAX step.

    Keras's JAX trainer passes every variable's value into the jitted step as
    `(trainable, non_trainable, optimizer, metrics)` and takes new values back;
    `fit` keeps them outside the variables between syncs. Hook state (strengths,
    counters, seeds, accumulators) must travel the same way: it is appended to the
    metrics group, so Keras's loops, which unpack four (three) groups, run
    unchanged. The model supplies `_kc_extra_state(training)`, the variables that
    travel after the metrics. These are Keras's private hooks into that loop
    (`_get_jax_state`, `jax_state_sync`, `_jax_state`, `_jax_state_synced`,
    `_get_state_sharding_spec`); Keras has no public way to add state.
    """

    _kc_test_spec = False

    def _get_jax_state(
        self,
        trainable_variables=False,
        non_trainable_variables=False,
        optimizer_variables=False,
        metrics_variables=False,
        purge_model_variables=False,
    ):
        state = super()._get_jax_state(
            trainable_variables=trainable_variables,
            non_trainable_variables=non_trainable_variables,
            optimizer_variables=optimizer_variables,
            metrics_variables=metrics_variables,
            purge_model_variables=purge_model_variables,
        )
        if not metrics_variables:
            return state
        extra = self._kc_extra_state(training=optimizer_variables)
        state = list(state)
        state[-1] = list(state[-1]) + [v.value for v in extra]
        return tuple(state)

    def jax_state_sync(self):
        jax_state = getattr(self, "_jax_state", None)
        if not jax_state or self._jax_state_synced:
            return
        values = jax_state.get("metrics_variables", None)
        if values:
            n = len(self.metrics_variables)
            training = jax_state.get("optimizer_variables", None) is not None
            for variable, value in zip(self._kc_extra_state(training), values[n:]):
                variable.assign(value)
            self._jax_state = dict(jax_state, metrics_variables=list(values[:n]))
        super().jax_state_sync()

    def _get_state_sharding_spec(self):
        trainable, non_trainable, optimizer, metrics = super()._get_state_sharding_spec()
        extra = self._kc_extra_state(training=not self._kc_test_spec)
        metrics = list(metrics) + [v.value.sharding for v in extra]
        return trainable, non_trainable, optimizer, metrics

    def make_test_function(self, force=False):
        object.__setattr__(self, "_kc_test_spec", True)
        try:
            return super().make_test_function(force=force)
        finally:
            object.__setattr__(self, "_kc_test_spec", False)

    def _kc_sync_jax_state(self):
        """Makes the variables current mid-`fit` (before a hook's `check`)."""
        if getattr(self, "_jax_state", None) is not None:
            self.jax_state_sync()


# ---------------------------------------------------------------------------------
# TensorFlow. Checked on Keras 3.12-3.15 with TensorFlow 2.18-2.21.
# ---------------------------------------------------------------------------------


def tf_leave_package_to_python(package):
    """Keeps AutoGraph from rewriting `package`'s code.

    Our step code is plain Python over tensors, like Keras's own (which AutoGraph
    leaves alone): a user's `tf.function` that calls `model.compute_loss` or
    `model.apply_hooks` must not have AutoGraph convert it (it cannot, and says
    so). `tf.autograph.experimental.do_not_convert` works per function, not per
    package.
    """
    from tensorflow.python.autograph.core import config

    if not any(getattr(r, "_prefix", None) == package for r in config.CONVERSION_RULES):
        config.CONVERSION_RULES = (config.DoNotConvert(package), *config.CONVERSION_RULES)


def _skip_when_reduced(optimizer, original, grads_and_vars):
    if optimizer.__dict__.get("_kc_reduced", 0) > 0:
        return list(grads_and_vars)
    return original(grads_and_vars)


def _tf_optimizers(optimizer):
    """The optimizer and those it wraps (`LossScaleOptimizer`, `MultiOptimizer`)."""
    out = [optimizer]
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:
        out += _tf_optimizers(inner)
    for sub in getattr(optimizer, "optimizers", None) or ():
        out += _tf_optimizers(sub)
    return out


@contextlib.contextmanager
def tf_already_reduced(optimizer):
    """Inside, a TensorFlow optimizer applies gradients without summing them over
    replicas.

    Keras's `TFOptimizer.apply` sums the replicas' gradients in
    `_all_reduce_sum_gradients`; our step has already summed them once, before the
    hooks (which must see the global gradient). Summing again would multiply them
    by the number of replicas. No public switch exists. A count (not a flag) per
    optimizer, because the replicas' threads enter and leave this scope in turns.
    """
    optimizers = _tf_optimizers(optimizer)
    for opt in optimizers:
        if "_kc_reduced" not in opt.__dict__:
            original = opt._all_reduce_sum_gradients
            object.__setattr__(opt, "_kc_reduced", 0)
            object.__setattr__(
                opt,
                "_all_reduce_sum_gradients",
                functools.partial(_skip_when_reduced, opt, original),
            )
        object.__setattr__(opt, "_kc_reduced", opt._kc_reduced + 1)
    try:
        yield
    finally:
        for opt in optimizers:
            object.__setattr__(opt, "_kc_reduced", opt._kc_reduced - 1)


# ---------------------------------------------------------------------------------
# Per-example gradients (keras_custom.privacy). Checked on Keras 3.12-3.15 (the
# PyTorch entry on 3.15: the JAX-only test set-up of 3.12 has no PyTorch).
# ---------------------------------------------------------------------------------


def compiled_loss(model):
    """The `CompileLoss` that `compile(loss=...)` made (`None` without a loss).

    A per-example loss is this loss on a batch of one; Keras has no public handle
    on it (`model.compute_loss` also adds `model.losses`, which are not
    per-example terms).
    """
    return getattr(model, "_compile_loss", None)


def compiled_loss_entries(compile_loss, y, y_pred):
    """The `(path, loss, loss_weight)` of each output's loss in a `CompileLoss`,
    built for `y`, `y_pred` if it is not yet (Keras builds it at the first call).
    Keras keeps them in `_flat_losses` (a list of named tuples whose first three
    fields are these on 3.12-3.15)."""
    if not compile_loss.built:
        compile_loss.build(y, y_pred)
    return [tuple(entry)[:3] for entry in compile_loss._flat_losses]


def keras_mask(x):
    """The Keras mask a tensor carries (`None` if none): masked outputs reweight the
    loss by batch-level counts, so an example's loss is not one of a batch of one."""
    from keras.src.backend import get_keras_mask

    return get_keras_mask(x)


def squeeze_or_expand_to_same_rank(x1, x2):
    """How `keras.losses.Loss` lines up the sample weights with the loss values
    (the rule a per-example loss must follow to equal Keras's)."""
    from keras.src.losses.loss import squeeze_or_expand_to_same_rank as same_rank

    return same_rank(x1, x2)


def own_trainable_variables(layer):
    """The trainable variables `layer` created itself (not its sublayers'):
    Keras keeps them in `layer._trainable_variables`."""
    own = {id(v) for v in layer._trainable_variables}
    return [v for v in layer.trainable_variables if id(v) in own]


def sublayers(layer):
    """Every layer inside `layer`, recursively (not `layer`). `layer.layers` lists
    only the direct ones of a model, and layers nested in layers (the projections
    of `MultiHeadAttention`) are only in `_flatten_layers`."""
    return list(layer._flatten_layers(include_self=False, recursive=True))


def runs_its_own_call(layer, cls):
    """Whether `layer` is a `cls` that computes exactly `cls.call`: no subclass
    override, no LoRA, no quantization, no rematerialization (what a rule that
    recomputes the layer's math, such as a ghost norm, assumes)."""
    return (
        isinstance(layer, cls)
        and type(layer).call is cls.call
        and not getattr(layer, "lora_enabled", False)
        and getattr(layer, "quantization_mode", None) is None
        and getattr(layer, "_remat_mode", None) is None
    )


@contextlib.contextmanager
def calls_replaced(replacements):
    """Replaces the `call` of given layer objects (not of their class) while inside.

    `replacements` is a list of `(layer, function)`. Keras's `Layer.__call__` (and
    `Operation.__call__`, through which a functional model and a layer's own
    sublayers are called) looks `call` up on the object, so an instance attribute
    runs instead of the class's method for that object only, on every backend.
    `object.__setattr__` keeps Keras's attribute tracking (and PyTorch's
    `nn.Module.__setattr__`) out of it; on exit the attributes are deleted and the
    layers are as before. Nothing else offers a per-object, per-call hook that
    sees the layer's inputs on all backends.
    """
    done = []
    try:
        for layer, fn in replacements:
            previous = layer.__dict__.get("call", _MISSING)
            object.__setattr__(layer, "call", fn)
            done.append((layer, previous))
        yield
    finally:
        for layer, previous in reversed(done):
            if previous is _MISSING:
                del layer.__dict__["call"]
            else:
                object.__setattr__(layer, "call", previous)


_MISSING = object()


@contextlib.contextmanager
def torch_vmap_safe():
    """Lets `torch.func.vmap` run Keras's PyTorch convolutions.

    Keras converts a convolution's input and kernel to the `channels_last` memory
    format (`keras/src/backend/torch/nn.py`, `_maybe_convert_to_channels_last`, a
    speed-up that keeps every value); `torch.func.vmap` refuses
    `Tensor.contiguous(memory_format=...)` ("NYI"). Inside, the conversion is the
    identity. Checked on Keras 3.15 with PyTorch 2.13.
    """
    from keras.src.backend.torch import nn as torch_nn

    original = getattr(torch_nn, "_maybe_convert_to_channels_last", None)
    if original is None:
        yield
        return
    torch_nn._maybe_convert_to_channels_last = lambda tensor: tensor
    try:
        yield
    finally:
        torch_nn._maybe_convert_to_channels_last = original
