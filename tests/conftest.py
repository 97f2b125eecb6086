"""Hypothesis profiles for the property tests.

``deadline=None`` everywhere: the first call of each kernel specialisation
compiles, which takes seconds and says nothing about the code under test.
The "ci" profile (chosen when the ``CI`` environment variable is set) is
derandomized so that a CI run is reproducible, and keeps no example database
because CI workspaces are thrown away.  Pick a profile by hand with
``pytest --hypothesis-profile=dev``.
"""

import os

from hypothesis import settings

settings.register_profile("dev", max_examples=30, deadline=None)
settings.register_profile(
    "ci", max_examples=30, deadline=None, derandomize=True, database=None, print_blob=True
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
