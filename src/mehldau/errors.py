"""Errors a user can cause and fix.

`UserError` is raised for expected bad input (a missing folder, a wrong checkpoint, a
non-positive length). The command-line entry points print its message as one line and exit
with status 2 instead of showing a traceback; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input with a message that names the problem and the fix, in one line."""
