"""`kc.attach` on a KerasHub task: a tiny `GPT2CausalLM` fine-tuned with LoRA.

Built from a config (vocabulary 64, 1 layer, 2 heads, hidden 16): nothing is
downloaded. `import keras_hub` takes about 10 s and loads TensorFlow on every
backend, so it happens only here, in a fixture; the tests skip where keras-hub is
not installed (it needs Keras >= 3.15). One trained model (`lora`, one fit) is
shared by the tests of this file.
"""

import importlib.util
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import BACKEND

import keras_custom as kc
from keras_custom import _keras
from keras_custom import hooks
from keras_custom.backend import Trainer
from keras_custom.step.saving import public_optimizers

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("keras_hub") is None or _keras.KERAS_VERSION < (3, 15),
    reason="needs keras-hub (the `test` extra), which needs Keras >= 3.15",
)

CLIP = 0.01  # below the raw gradient norm of this problem (about 0.02): it bites
LORA_PATHS = {
    f"transformer_layer_0/self_attention/{proj}/{name}"
    for proj in ("query", "value")
    for name in ("bias", "lora_kernel_a", "lora_kernel_b")
}


@pytest.fixture(scope="module")
def keras_hub():
    import keras_hub

    return keras_hub


def tiny_gpt2(keras_hub, preprocessor=None):
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=64,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=16,
        dropout=0.0,  # the reference gradient below runs without dropout
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)


TEXT = ["ab ba cab", "a bad cab", "abba", "bab a cab", "cab ab", "a cab", "bad", "ba"]


def tiny_preprocessor(keras_hub):
    """A GPT-2 tokenizer over letters (vocabulary < 64), built from a dict."""
    vocabulary = {"<|endoftext|>": 0}
    for token in [*"abcdefghijklmnopqrstuvwxyz", "Ġ", "Ġa", "Ġb", "ab"]:
        vocabulary[token] = len(vocabulary)
    tokenizer = keras_hub.models.GPT2Tokenizer(
        vocabulary=vocabulary, merges=["Ġ a", "Ġ b", "a b"]
    )
    return keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer=tokenizer, sequence_length=16
    )


@keras.saving.register_keras_serializable(package="tests_attach_hub")
class SeenGradients(kc.Hook):
    """Records which variables the gradient stage sees (at trace time)."""

    def process_gradients(self, grads, variables, step):
        self.seen = [v.path for v in variables]
        self.shapes = [tuple(g.shape) for g in grads]
        return grads


def reference_grad_norm(lm, x, y, sample_weight):
    """The global norm of the gradient of the task's own loss with respect to its
    trainable variables, taken with the backend's own autodiff."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = lm.trainable_variables
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(y, lm(x), sample_weight)
        grads = tape.gradient(loss, variables)
    elif BACKEND == "jax":
        import jax

        others = [v.value for v in lm.non_trainable_variables]

        def f(values):
            logits, _ = lm.stateless_call(values, others, x)
            return loss_fn(y, logits, sample_weight)

        grads = jax.grad(f)([v.value for v in variables])
    else:
        import torch

        loss = loss_fn(y, lm(x), sample_weight)
        grads = torch.autograd.grad(loss, [v.value for v in variables])
    return float(
        np.sqrt(sum(np.sum(np.square(keras.ops.convert_to_numpy(g))) for g in grads))
    )


@pytest.fixture(scope="module")
def lora(keras_hub, tmp_path_factory):
    """A LoRA GPT-2 with a preprocessor, hooks attached; one `train_on_batch` and
    one epoch of `fit` on raw text (one train function: batches of 4), then saved
    (`hooked.keras`)."""
    from keras_hub.src.utils.pipeline_model import PipelineModel

    out = {"dir": tmp_path_factory.mktemp("lora")}
    lm = tiny_gpt2(keras_hub, preprocessor=tiny_preprocessor(keras_hub))
    out["defaults"] = (lm.optimizer, lm.loss, lm.get_compile_config())
    lm.backbone.enable_lora(rank=4)
    seen = SeenGradients()
    attached = kc.attach(
        lm,
        [
            seen,
            hooks.LogGradNorm(name="grad_norm_raw"),
            hooks.ClipByGlobalNorm(CLIP),
            hooks.LogGradNorm(),
            hooks.SkipNonFinite(),
        ],
    )
    assert attached is lm
    # The batch the task's preprocessing makes of the first four texts.
    out["reference_norm"] = reference_grad_norm(lm, *lm.preprocessor(TEXT[:4]))
    out["first"] = lm.train_on_batch(TEXT[:4], return_dict=True)

    calls = []
    pipeline_fit = PipelineModel.fit

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("batch_size"))
        return pipeline_fit(self, *args, **kwargs)

    PipelineModel.fit = spy
    try:
        out["history"] = lm.fit(TEXT, batch_size=4, epochs=1, verbose=0).history
    finally:
        PipelineModel.fit = pipeline_fit
    out.update(lm=lm, seen=seen, pipeline_fit_calls=calls)

    lm.hooks[2].max_norm = CLIP / 2  # state that the file's config does not hold
    lm.save(out["dir"] / "hooked.keras")
    out["prediction"] = keras.ops.convert_to_numpy(lm.predict(TEXT, verbose=0))
    return out


def test_only_lora_variables_train(lora):
    # `enable_lora` also leaves the query and value biases trainable.
    assert {v.path for v in lora["lm"].trainable_variables} == LORA_PATHS


def test_task_class_and_compile_defaults_are_kept(lora, keras_hub):
    lm = lora["lm"]
    optimizer, loss, config = lora["defaults"]
    assert isinstance(lm, keras_hub.models.GPT2CausalLM) and isinstance(lm, Trainer)
    assert isinstance(lm, keras_hub.models.GPT2CausalLM)
    assert type(lm).__name__ == "GPT2CausalLM"
    assert lm.optimizer is optimizer and lm.loss is loss
    # (On PyTorch the optimizer is named by its public class: see public_optimizers.)
    assert lm.get_compile_config() == public_optimizers(config)
    assert np.isclose(float(np.asarray(lm.optimizer.learning_rate)), 2e-5)
    # KerasHub's own `fit` ran (it wraps the data in a dataset, preprocessing it),
    # reached through the hooked class's `fit`.
    assert lora["pipeline_fit_calls"] == [4]
    assert int(lm.optimizer.iterations) == 3  # train_on_batch + 2 batches of 4
    assert lm.preprocessor is not None  # fit took raw text: it was preprocessed


def test_hooks_see_exactly_the_trainable_gradients(lora):
    lm, seen = lora["lm"], lora["seen"]
    assert seen.seen == [v.path for v in lm.trainable_variables]
    assert seen.shapes == [tuple(v.shape) for v in lm.trainable_variables]
    # The first step's gradient, before the clip: the true gradient of the loss.
    first = lora["first"]
    np.testing.assert_allclose(first["grad_norm_raw"], lora["reference_norm"], rtol=1e-4)


def test_clip_holds_and_grad_norm_is_logged(lora):
    first, history = lora["first"], lora["history"]
    assert first["grad_norm_raw"] > CLIP
    assert first["grad_norm"] <= CLIP * (1 + 1e-5)
    assert min(history["grad_norm_raw"]) > CLIP
    assert max(history["grad_norm"]) <= CLIP * (1 + 1e-5)
    assert {"loss", "sparse_categorical_accuracy", "skipped_steps"} <= set(history)
    assert history["skipped_steps"] == [0.0]


def test_file_names_the_task_and_restores_hooks(lora, keras_hub):
    import zipfile

    with zipfile.ZipFile(lora["dir"] / "hooked.keras") as archive:
        config = json.loads(archive.read("config.json"))
    assert config["registered_name"] == "keras_hub>GPT2CausalLM"
    assert config["class_name"] == "GPT2CausalLM"
    assert config["module"] == "keras_hub.src.models.gpt2.gpt2_causal_lm"

    lm = lora["lm"]
    restored = keras.models.load_model(lora["dir"] / "hooked.keras")
    assert isinstance(restored, keras_hub.models.GPT2CausalLM)
    assert type(restored).__name__ == "GPT2CausalLM"
    assert isinstance(restored, Trainer)
    assert [h.get_config() for h in restored.hooks] == [h.get_config() for h in lm.hooks]
    assert restored.hooks[2].max_norm == np.float32(CLIP / 2)
    for a, b in zip(lm.hooks, restored.hooks, strict=True):
        for u, v in zip(a.variables, b.variables, strict=True):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(restored.predict(TEXT, verbose=0)),
        lora["prediction"],
        rtol=1e-5,
        atol=1e-5,
    )
    # KerasHub's file keeps no LoRA: the adapters are merged into the kernels.
    assert not [v for v in restored.variables if "lora" in v.path]
    # The task overrides `compile`, so Keras does not compile it from the file: it
    # has the task's default optimizer, fresh (plain Keras does the same).
    assert int(restored.optimizer.iterations) == 0
    hooks_before = restored.hooks
    restored.compile(optimizer=keras.optimizers.Adam(1e-3))
    assert restored.hooks == hooks_before  # compile without `hooks=` keeps them


LOAD_WITHOUT_KERAS_CUSTOM = r"""
import json, re, sys, warnings

class NoKerasCustom:
    def find_spec(self, name, path=None, target=None):
        if name == "keras_custom" or name.startswith("keras_custom."):
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, NoKerasCustom())
import keras
import keras_hub
import numpy as np

d = sys.argv[1]
text = json.loads(sys.argv[2])
report = {}
for name in ("hooked", "plain"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = keras.models.load_model(f"{d}/{name}.keras")
    pred = model.predict(text, verbose=0)
    np.save(f"{d}/{name}.pred.npy", keras.ops.convert_to_numpy(pred))
    report[name] = {
        "class": type(model).__module__ + "." + type(model).__qualname__,
        "hooks": hasattr(model, "hooks"),
        # Keras numbers a second optimizer of a process ("adam_1"): not ours.
        "warnings": sorted({re.sub(r"'([a-z]+)_\d+'", r"'\1'", str(w.message))[:60]
                            for w in caught}),
    }
assert "keras_custom" not in sys.modules
print(json.dumps(report))
"""


def test_file_loads_without_keras_custom(lora):
    """The file loads as the plain task, with identical predictions and the same
    warnings as a file the task wrote with no hooks (KerasHub's own)."""
    lm = lora["lm"]
    kept = lm.hooks
    kc.attach(lm, [])
    try:
        lm.save(lora["dir"] / "plain.keras")
    finally:
        kc.attach(lm, kept)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_WITHOUT_KERAS_CUSTOM,
            str(lora["dir"]),
            json.dumps(TEXT),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    hooked, plain = report["hooked"], report["plain"]
    assert hooked["class"] == "keras_hub.src.models.gpt2.gpt2_causal_lm.GPT2CausalLM"
    assert not hooked["hooks"]
    assert hooked["warnings"] == plain["warnings"]
    assert not any("keras_custom" in w for w in hooked["warnings"])
    got = np.load(lora["dir"] / "hooked.pred.npy")
    np.testing.assert_array_equal(got, np.load(lora["dir"] / "plain.pred.npy"))
    # (The saved kernels have LoRA merged in: float32 rounding differs.)
    np.testing.assert_allclose(got, lora["prediction"], rtol=1e-5, atol=1e-5)


def test_lora_files_whose_hooks_do_not_fit_the_merged_model(keras_hub, tmp_path):
    """A file keeps LoRA merged into the kernels: hooks chosen by a LoRA pattern,
    or gradient accumulators sized for the LoRA variables, do not fit the model
    that loads. It loads all the same (as without keras_custom), with a warning."""

    def lora_task(hook_list, optimizer="adam"):
        lm = tiny_gpt2(keras_hub)
        lm.backbone.enable_lora(rank=4)
        lm.compile(optimizer=optimizer)
        return kc.attach(lm, hook_list)

    lm = lora_task([hooks.WeightPenalty(l2=1e-3, include="lora")])
    lm.save(tmp_path / "pattern.keras")
    with pytest.warns(UserWarning, match="the file's hooks were not restored"):
        restored = keras.models.load_model(tmp_path / "pattern.keras")
    assert type(restored) is keras_hub.models.GPT2CausalLM  # plain: no hooks

    optimizer = keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)
    lm = lora_task([hooks.ClipByGlobalNorm(0.5)], optimizer)
    assert lm.gradient_accumulation_steps == 2
    lm.save(tmp_path / "accumulating.keras")
    with pytest.warns(UserWarning, match="gradient accumulation .* is not restored"):
        restored = keras.models.load_model(tmp_path / "accumulating.keras")
    assert [type(h).__name__ for h in restored.hooks] == ["ClipByGlobalNorm"]
    assert restored.gradient_accumulation_steps is None
    restored.compile(
        optimizer=keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)
    )  # as the warning says
    assert restored.gradient_accumulation_steps == 2
    assert [type(h).__name__ for h in restored.hooks] == ["ClipByGlobalNorm"]
