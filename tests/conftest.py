"""Hypothesis profiles for the property tests.

``deadline=None`` everywhere: the first call of each kernel specialisation
compiles, which takes seconds and says nothing about the code under test.
The "ci" profile (chosen when the ``CI`` environment variable is set) is
derandomized so that a CI run is reproducible, and keeps no example database
because CI workspaces are thrown away.  Pick a profile by hand with
``pytest --hypothesis-profile=dev``.
"""

import os
import warnings

import pytest
from hypothesis import settings

# On a failure Hypothesis imports this module (and through it libcst) to
# print a patch; an older libcst warns at import time, which the test run's
# ``filterwarnings = error`` would turn into an INTERNALERROR hiding the
# failure.  Importing it once here, quietly, keeps failure reports readable.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:  # libcst missing: Hypothesis skips the patch itself
        pass

settings.register_profile("dev", max_examples=30, deadline=None)
settings.register_profile(
    "ci", max_examples=30, deadline=None, derandomize=True, database=None, print_blob=True
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_addoption(parser):
    parser.addoption(
        "--activations",
        choices=("fast", "exact"),
        default=None,
        help="run the kernels with this activation mode (default: fastgates' own default)",
    )


def pytest_configure(config):
    mode = config.getoption("--activations")
    if mode is not None:
        import fastgates

        fastgates.set_activation_mode(mode)


def pytest_collection_modifyitems(config, items):
    # tox runs the suite twice: in the default (fast) activation mode, then
    # with --activations=exact.  Tests marked default_pass_only run in the
    # first pass only: the float64 PyTorch oracles at realistic sizes (they
    # check the size-dependent paths: tiles, chunks, blocks, overlapped
    # kernels, which are the same code in both modes) and the documentation's
    # code blocks (they check that the pages run as written).  Kernel
    # correctness in the exact mode stays covered in the second pass by the
    # small-shape oracles of test_torch.py, test_reference.py,
    # test_gradcheck.py and test_variants.py, which run in both.
    if config.getoption("--activations") != "exact":
        return
    skip = pytest.mark.skip(reason="default_pass_only: runs in the default-activation pass")
    for item in items:
        if item.get_closest_marker("default_pass_only"):
            item.add_marker(skip)


def pytest_report_header(config):
    import fastgates

    mode = config.getoption("--activations") or fastgates.get_activation_mode()
    return f"fastgates activation mode: {mode}"
