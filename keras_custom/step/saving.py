"""What a `.keras` file holds of keras_custom, and how it comes back.

A file written from a hooked model names the model's Keras class (`Sequential`,
`Functional`) or the user's own class (for `kc.attach`), never ours, so that it loads
wherever Keras loads files, as the plain model. Our part is one more top-level key
of the file's `config.json`, which plain Keras ignores:

    "keras_custom": {"version": "0.2.0", "class": "keras_custom>Sequential" or
                     None, "attached": bool, "hooks": [serialized hooks],
                     "gradient_accumulation_steps": N or None}

The hooks' state is saved with the model's weights (under `hooks/`), which plain
Keras does not read. Where keras_custom is imported, `load_model` gives the model
back with its class and hooks (`restore` below) before the weights, and so the
hooks' state, are loaded. Files of keras_custom 0.1 (our class names, hooks in the
compile config) load as before. (`keras_custom._keras.on_model_file` is where
Keras's saver calls these.)
"""

import contextlib
import copy
import threading
import warnings

import keras

from keras_custom import _keras

FORMAT_VERSION = "0.2.0"


def marker_of(model):
    """Our part of `model`'s file, or `None` when there is none."""
    cls = type(model)
    pipeline = getattr(model, "_kc", None)
    if pipeline is None and not hasattr(cls, "_kc_own_class"):
        return None
    hooks = pipeline.hooks if pipeline is not None else ()
    own = cls.__dict__.get("_kc_own_class")  # kc.Sequential, kc.Functional
    attached = bool(cls.__dict__.get("_kc_attached"))
    steps = None
    if pipeline is not None and pipeline.accumulator is not None:
        steps = pipeline.accumulator.steps
    if own is None and not hooks and steps is None:
        return None
    return {
        "version": FORMAT_VERSION,
        "class": own,
        "attached": attached,
        "hooks": [keras.saving.serialize_keras_object(h) for h in hooks],
        "gradient_accumulation_steps": steps,
    }


def restore(config, marker, build, custom_objects, safe_mode):
    """Builds the model of a file's config with its class and hooks."""
    if not isinstance(marker, dict):
        raise ValueError(
            f"keras_custom: the file's {_keras.FILE_KEY!r} entry must be a dict. "
            f"Received: {marker!r}"
        )
    config = copy.deepcopy(config)
    if keras.saving.get_registered_object("keras_custom>Hook") is None:
        # `keras.saving.get_custom_objects().clear()` removed our classes: the
        # file loads as what it names, as in a process without keras_custom.
        warnings.warn(
            "keras_custom's classes are not registered (was "
            "`keras.saving.get_custom_objects()` cleared?): the file loads as the "
            "plain Keras model it names, without its hooks.",
            stacklevel=3,
        )
        return build(config)
    own = marker.get("class")
    if own is not None:
        cls = keras.saving.get_registered_object(own)
        if cls is None or not hasattr(cls, "_kc_own_class"):
            raise ValueError(
                f"keras_custom: the file names the model class {own!r}, which is not "
                f"one of keras_custom's. Received: class={own!r}"
            )
        config.update(module=cls.__module__, class_name=cls.__name__, registered_name=own)
    hooks = [
        keras.saving.deserialize_keras_object(
            h, custom_objects=custom_objects, safe_mode=safe_mode
        )
        for h in marker.get("hooks") or ()
    ]
    from keras_custom.hook import Hook

    for i, hook in enumerate(hooks):
        if not isinstance(hook, Hook):
            raise ValueError(
                f"keras_custom: the file's hooks[{i}] is not a keras_custom.Hook. "
                f"Received: {type(hook).__name__}"
            )
    steps = marker.get("gradient_accumulation_steps")
    attached = bool(marker.get("attached"))
    if attached and steps:
        # The model's own class compiles from the config: its optimizer must not
        # accumulate (the model does, once hooks are attached).
        optimizer = (config.get("compile_config") or {}).get("optimizer")
        _clear_accumulation(optimizer)
    model = build(config)
    from keras_custom.attach import attach_restored

    attach_restored(model, hooks, steps if attached else None)
    return model


def _clear_accumulation(config):
    if not isinstance(config, dict) or not isinstance(config.get("config"), dict):
        return
    inner = config["config"].get("inner_optimizer")
    if config.get("class_name") == "LossScaleOptimizer" and isinstance(inner, dict):
        _clear_accumulation(inner)
    else:
        config["config"]["gradient_accumulation_steps"] = None


def compiled_metric_names(compile_config):
    """The names the compiled metrics of a compile config will log under."""
    names = set()
    if not compile_config:
        return names

    def walk(value):
        if isinstance(value, str):
            names.add(value)
        elif isinstance(value, dict):
            if "class_name" in value and isinstance(value.get("config"), dict):
                name = value["config"].get("name")
                if isinstance(name, str):
                    names.add(name)
            else:
                for item in value.values():
                    walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(compile_config.get("metrics"))
    walk(compile_config.get("weighted_metrics"))
    return names


public_optimizers = _keras.public_optimizers

_naming = threading.local()


@contextlib.contextmanager
def file_naming():
    """While a file is written, a hooked model names the class its file names
    (see `Trainer.__class__`)."""
    depth = getattr(_naming, "depth", 0)
    _naming.depth = depth + 1
    try:
        yield
    finally:
        _naming.depth = depth


def naming_for_files():
    return getattr(_naming, "depth", 0) > 0


_keras.on_model_file(marker_of, restore, file_naming)
