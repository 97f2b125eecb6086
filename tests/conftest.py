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


def pytest_report_header(config):
    import fastgates

    mode = config.getoption("--activations") or fastgates.get_activation_mode()
    return f"fastgates activation mode: {mode}"
