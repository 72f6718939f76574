"""Files written by keras_custom 0.1.0 still load, with their hooks and state, and
training resumed from them lands where 0.1.0 landed.

The files were written by `tests/fixtures/make_v0_1.py` with the 0.1.0 code, once
per backend; each backend's run of the suite reads its own (the hooks' random
streams differ between backends).
"""

import pathlib
import sys

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import requires_keras

HERE = pathlib.Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(HERE))

from v0_1_models import KINDS  # noqa: E402
from v0_1_models import data  # noqa: E402


@requires_keras(3, 15, "files written by Keras 3.15 (these were) load in Keras 3.15")
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_0_1_file_loads_and_resumes(kind):
    path = HERE / "v0_1" / f"{kind}-{BACKEND}.keras"
    expected = np.load(HERE / "v0_1" / f"{kind}-{BACKEND}.npz")
    x, y, probe = data()
    model = keras.models.load_model(path)
    np.testing.assert_array_equal(
        model.predict(probe, verbose=0), expected["predictions"]
    )
    assert int(model.optimizer.iterations) == int(expected["iterations"])
    reference = type(KINDS[kind]().hooks[0])
    assert type(model.hooks[0]) is reference
    for i, hook in enumerate(model.hooks):
        for j, variable in enumerate(hook.variables):
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(variable), expected[f"hook{i}_{j}"]
            )
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for i, w in enumerate(model.get_weights()):
        np.testing.assert_allclose(w, expected[f"resumed{i}"], rtol=1e-6, atol=1e-7)
