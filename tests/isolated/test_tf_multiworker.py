"""MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1 train like one
device. Each worker runs the model's own `train_step` under `strategy.run` on its
half of every global batch (Keras 3.15's `fit` and `train_on_batch` fail under
this strategy on their own, before any hook runs: docs/what-hooks-see.md)."""

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

if keras.backend.backend() != "tensorflow":
    pytest.skip("tf.distribute: TensorFlow backend only", allow_module_level=True)

import keras_custom as kc  # noqa: E402
from keras_custom import hooks  # noqa: E402

TIMEOUT = 240  # seconds for both workers together

WORKER = r"""
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
os.environ["KERAS_BACKEND"] = "tensorflow"
import numpy as np
import tensorflow as tf
strategy = tf.distribute.MultiWorkerMirroredStrategy()
import keras
import keras_custom as kc
from keras_custom import hooks

x, y = (np.load(sys.argv[1])[k] for k in ("x", "y"))
task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
with strategy.scope():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh", name="hidden")(inputs)
    model = kc.Model(inputs, keras.layers.Dense(1, name="out")(h))
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse", hooks=[
        hooks.LogGradNorm(name="grad_norm_raw"), hooks.ClipByGlobalNorm(0.3),
        hooks.LogGradNorm()])
    model.optimizer.build(model.trainable_variables)

@tf.function
def step(x, y):
    strategy.run(model.train_step, args=((x, y),))

logs = []
for epoch in range(2):
    for b in range(2):
        rows = slice(16 * b + 8 * task, 16 * b + 8 * task + 8)
        for m in model.metrics:
            m.reset_state()
        step(tf.constant(x[rows]), tf.constant(y[rows]))
        logs.append({k: float(v) for k, v in model.get_metrics_result().items()})
np.savez(sys.argv[2], *[np.array(w) for w in model.get_weights()])
with open(sys.argv[2] + ".json", "w") as f:
    json.dump(logs, f)
"""


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = (x @ rng.normal(size=(6, 1)) * 3.0 + 1.0).astype("float32")
    return x, y


def _single_device(x, y):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh", name="hidden")(inputs)
    model = kc.Model(inputs, keras.layers.Dense(1, name="out")(h))
    model.compile(
        keras.optimizers.SGD(0.1, momentum=0.9),
        "mse",
        hooks=[
            hooks.LogGradNorm(name="grad_norm_raw"),
            hooks.ClipByGlobalNorm(0.3),
            hooks.LogGradNorm(),
        ],
    )
    logs = []
    for _ in range(2):
        for b in range(2):
            rows = slice(16 * b, 16 * b + 16)
            logs.append(model.train_on_batch(x[rows], y[rows], return_dict=True))
    return model.get_weights(), logs


def test_two_workers_match_one_device(tmp_path):
    x, y = _data()
    np.savez(tmp_path / "data.npz", x=x, y=y)
    (tmp_path / "worker.py").write_text(WORKER)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    procs = []
    for i in range(2):
        env = dict(
            os.environ,
            TF_CONFIG=json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": i}}
            ),
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(tmp_path / "worker.py"),
                    str(tmp_path / "data.npz"),
                    str(tmp_path / f"out{i}.npz"),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]

    weights, logs = _single_device(x, y)
    flat = np.concatenate([np.ravel(w) for w in weights])
    for i in range(2):
        saved = np.load(tmp_path / f"out{i}.npz")
        theirs = np.concatenate(
            [np.ravel(saved[f"arr_{k}"]) for k in range(len(weights))]
        )
        assert np.linalg.norm(theirs - flat) <= 1e-6 * np.linalg.norm(flat)
        worker_logs = json.loads((tmp_path / f"out{i}.npz.json").read_text())
        for key in ("grad_norm_raw", "grad_norm", "loss"):
            np.testing.assert_allclose(
                [entry[key] for entry in worker_logs],
                [float(entry[key]) for entry in logs],
                rtol=1e-5,
                err_msg=key,
            )
    assert max(entry["grad_norm_raw"] for entry in logs) > 0.3  # the clip bites
