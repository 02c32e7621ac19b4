"""User errors: a mistake in the user's input (a config key's value, a path, a file), not a bug in halfbody.

The entry points report a ``UserError`` as one line naming the key / file and the value, and exit with code 2
(no traceback; ``HYDRA_FULL_ERROR=1`` brings it back). Raise it wherever such a mistake is detected, with a
message that names what to fix, e.g. ``UserError("data.max_bad_fraction=2: expected a number in [0, 1]")``.
"""

from __future__ import annotations


class UserError(ValueError):
    """A bad config value, path or input file; the message is the one line the user sees."""
