"""Child Python processes of the tests: they import the fastgates under test.

``python -c`` puts its working directory first on ``sys.path``: started
from a source checkout (tox starts pytest there), a child imported the
checkout's fastgates instead of the installed one the tests run, and
compiled every kernel again into the checkout's own cache (measured in CI:
225 kernels, a third of the test time).  So a child starts in the folder
that holds the tests' fastgates.
"""

import subprocess
import sys

from fastgates.bench import child_root

ROOT = child_root()


def run_python(code, *args, **kwargs):
    """``subprocess.run`` of ``python -c code *args``, in :data:`ROOT` unless ``cwd`` is given."""
    kwargs.setdefault("cwd", ROOT)
    return subprocess.run([sys.executable, "-c", code, *args], **kwargs)
