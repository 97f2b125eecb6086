"""Error messages name the argument: as a word, not as part of another one.

``docs/guarantees.md`` promises messages that name the argument; a plain
substring test would accept ``"dstate"`` for ``state`` or ``"x_linear"``
for ``x``.  The name must stand alone: no word character on either side,
and no ``.`` before it (``head.dtype`` does not name ``dtype``).
"""

import re

import pytest


def word(name):
    """A regex matching ``name`` as a word of a message."""
    return rf"(?<![\w.]){re.escape(name)}(?!\w)"


def names(message, name):
    """Whether ``message`` names ``name`` as a word."""
    return re.search(word(name), message) is not None


def raises(exc, name):
    """``pytest.raises(exc)`` that wants ``name`` as a word in the message."""
    return pytest.raises(exc, match=word(name))
