"""One error for "everything wrong with this input", and one did-you-mean hint.

A user who fixes a file, a profile or a command line should see every problem at once, so
validators collect problems as strings and raise one :class:`ProblemsError` (or a subclass) at
the end. The message is ``source: problem`` for one and ``source: N problems:`` followed by one
``  - problem`` line each for several.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


def format_problems(problems: Sequence[str], source: str | None = None) -> str:
    """``source: p`` for one problem, ``source: N problems:\\n  - p1\\n  - p2`` for several."""
    lead = f"{source}: " if source else ""
    if len(problems) == 1:
        return lead + problems[0]
    listed = "".join(f"\n  - {problem}" for problem in problems)
    return f"{lead}{len(problems)} problems:{listed}"


class ProblemsError(ValueError):
    """An input that cannot be used; ``problems`` holds every reason, one string each, and
    ``source`` names the input (a file, a table, an option set) or is None."""

    def __init__(self, source: str | None, problems: Sequence[str] | str) -> None:
        self.source = source
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(format_problems(self.problems, source))

    def __reduce__(self) -> tuple[type, tuple[str | None, list[str]]]:
        return type(self), (self.source, self.problems)


def closest(name: object, known: Iterable[str]) -> str | None:
    """The known name closest to ``name`` (a likely typo of it), or None."""
    if not isinstance(name, str):
        return None
    matches = difflib.get_close_matches(name, list(known), n=1)
    return matches[0] if matches else None


def did_you_mean(name: object, known: Iterable[str], *, show: str = "{!r}") -> str:
    """`` (did you mean 'x'?)`` for a likely typo of a known name, else an empty string.

    ``show`` formats the suggestion (``"[{}]"`` for a TOML section, say).
    """
    match = closest(name, known)
    return f" (did you mean {show.format(match)}?)" if match is not None else ""
