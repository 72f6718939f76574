"""Every `>>>` example in the package's docstrings runs (an example that does not run
is a bug)."""

import doctest
import importlib
import inspect
import pkgutil

import keras
import pytest

import keras_custom

SKIP = {"keras_custom.demo"}
BACKEND_MODULES = {"tensorflow", "jax", "torch"}
# Modules whose examples need an optional dependency (an extra of pyproject.toml).
NEEDS = {"keras_custom.privacy.accounting": "dp_accounting"}


def modules():
    for info in pkgutil.walk_packages(keras_custom.__path__, "keras_custom."):
        name = info.name
        tail = name.rsplit(".", 1)[-1]
        if name in SKIP:
            continue
        if name.startswith("keras_custom.backend.") and tail in BACKEND_MODULES:
            if tail != keras.backend.backend():
                continue
        yield name


@pytest.mark.parametrize("name", sorted(modules()))
def test_docstring_examples_run(name):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    globs = {"keras": keras, "kc": keras_custom}
    for test in finder.find(module, name, globs=dict(globs, **vars(module))):
        runner.run(test)
    result = runner.summarize(verbose=False)
    if ">>>" in inspect.getsource(module):
        assert result.attempted > 0, f"no example of {name} was run"
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
