"""The one base of every error fedpriv reports to a person.

A `FedprivError`'s message names the setting, file, row or party at fault and
is complete on its own: the `fedpriv` command prints it (no traceback) and
exits 2. Anything else that escapes is a bug and keeps its traceback.
"""


class FedprivError(Exception):
    """An error a user can act on; the message says what and where."""
