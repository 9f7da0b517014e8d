"""The one base of every error that is the user's to fix (a recipe key, a file, a folder, a shape the model cannot
take): its message names the problem and the fix, and the command line prints it alone (exit 2). Anything else is
an internal error and shows its traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, named with its fix."""


class InputError(UserError, ValueError):
    """A user error with no more specific class (a folder that is not what a command needs, say)."""
