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


def user_message(error: UserError) -> str:
    """The message to show for ``error``, without the worker traceback that torch's DataLoader wraps
    around an exception it re-raises from a worker process.

    A UserError raised in a DataLoader worker reaches the training process as
    ``UserError("Caught UserError in DataLoader worker process 0.\\nOriginal Traceback ...\\n
    elastictrain.errors.UserError: MESSAGE")`` (torch.utils.data._utils.ExceptionWrapper); the user needs
    MESSAGE only. tests/test_errors.py runs a real DataLoader worker, so a torch that changes the wrapping
    fails that test rather than showing users a traceback.
    """
    text = str(error)
    marker = f"{UserError.__module__}.{UserError.__qualname__}: "
    if text.startswith("Caught ") and "\nOriginal Traceback" in text and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text
