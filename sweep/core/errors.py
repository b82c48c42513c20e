"""The one base class of errors a user can act on.

Floor: sweep.core (no imports). Every error that means "your input or environment is not
what this needs" (a grid file, an option, a store, a dataset) derives from
:class:`UserError`, and its message names the problem. The CLI prints such an error as one
line and exits 1; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input or environment; the message says what and where."""
