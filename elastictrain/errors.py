"""The one exception type for mistakes a user can fix: a setting, a path, a file, a changed model.

The CLI turns a :class:`UserError` into one line on stderr and exit status 2, with no traceback, whether
it is raised while parsing the config or later at start-up (a run directory that is not writable, a
changed model on resume, a bad data file). Anything else is our bug or the machine's, and keeps its
traceback (exit 1). In a distributed job a UserError must be raised on every rank at once
(``dist.raise_together``), never by one rank while the others wait in a collective.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix; the message names the setting or file to change."""


EXIT_USER_ERROR = 2
"""Exit status for a UserError: the scripts (slurm/train.sh) never requeue it."""
