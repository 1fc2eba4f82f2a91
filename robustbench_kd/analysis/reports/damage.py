"""Damaged files of a run directory: one warning line per file, logged once the report is in place.

A report reads files that a crash, a full disk, a copy cut short or a hand edit can damage. A damaged
file that only feeds part of the report (a figure, a table) costs that part, not the report: each
reader notes the file with what is wrong and what the report leaves out, and the caller logs the notes
after the report has been written. Logging them afterwards keeps a command that then fails for another
reason (nothing usable left, a full disk) at its one error line.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

__all__ = ["Damage", "one_line"]


def one_line(text: str) -> str:
    """``text`` on one line: a path or a parser message with a line break must not split a warning."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


class Damage:
    """The damaged files met while building one report, in the order they were met; one note per file."""

    def __init__(self) -> None:
        self._notes: dict[str, tuple[str, str]] = {}  # path -> (what is wrong, what the report lacks)

    def note(self, path: str | os.PathLike[str], problems: str | list[str], consequence: str) -> None:
        """Record that ``path`` is damaged: its first problem (and how many more), then what the report lacks.

        A file noted before keeps its first note: every file is one warning line.
        """
        key = os.fspath(path)
        if key in self._notes:
            return
        found = [problems] if isinstance(problems, str) else list(problems)
        more = len(found) - 1
        text = found[0] + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")
        self._notes[key] = (one_line(text), one_line(consequence))

    def __contains__(self, path: object) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.fspath(path) in self._notes

    def __len__(self) -> int:
        return len(self._notes)

    def lines(self) -> list[str]:
        """The warning lines, one per damaged file."""
        return [f"warning: {problem}; {consequence}" for problem, consequence in self._notes.values()]

    def first(self) -> str | None:
        """What is wrong with the first damaged file, for a fatal message that cites the damage."""
        return next((problem for problem, _ in self._notes.values()), None)

    def emit(self) -> None:
        """Log every note as one warning line (after the report is in place)."""
        for line in self.lines():
            log.warning("%s", line)
