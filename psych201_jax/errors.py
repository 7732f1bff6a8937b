"""The package's user-error base class: what a command prints as one ``error: …`` line and exits 2 on.

Every error that a user can fix (bad data, config, checkpoint, results directory) derives from
``UserError``; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, configuration or files, stated in one line."""
