"""User errors: a mistake in the user's input (a config key's value, a path, a file), not a bug in halfbody.

The entry points report a ``UserError`` as one line naming the key / file and the value, and exit with code 2
(no traceback; ``HYDRA_FULL_ERROR=1`` brings it back). Raise it wherever such a mistake is detected, with a
message that names what to fix, e.g. ``UserError("data.max_bad_fraction=2: expected a number in [0, 1]")``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator


class UserError(ValueError):
    """A bad config value, path or input file; the message is the one line the user sees."""


def find_user_error(exc: BaseException | None) -> UserError | None:
    """The ``UserError`` that ``exc`` is or wraps (e.g. Hydra's ``InstantiationException`` raised ``from`` it)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def full_errors_wanted() -> bool:
    """``HYDRA_FULL_ERROR=1`` (or ``HALFBODY_DEBUG=1``): show the traceback of user errors too."""
    return any(os.environ.get(k, "") not in ("", "0") for k in ("HYDRA_FULL_ERROR", "HALFBODY_DEBUG"))


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Report a ``UserError`` raised inside (or wrapped by) the block as ``error: <message>`` on stderr, exit 2."""
    try:
        yield
    except Exception as e:
        user_error = find_user_error(e)
        if user_error is None or full_errors_wanted():
            raise
        print(f"error: {user_error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
