"""The one exception type reffuse raises for bad input.

A ReffuseError carries a message that names what is wrong (file, tensor, layer, shape, rank) and what to do.
The command line prints it as one line and exits with status 2, without a traceback.
"""


class ReffuseError(ValueError):
    """Bad input: a message meant for the user, not a bug in reffuse."""
