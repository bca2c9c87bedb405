"""The one exception type for bad user input.

Anything a user can get wrong (an unknown model, a layer out of range, a malformed feature
string) raises :class:`FeatoptError` with one sentence that names what was wrong and what is
allowed. The command line turns it into that sentence on stderr and exit status 2; library
users catch it like any exception.
"""


class FeatoptError(ValueError):
    """Bad input: the message says what was wrong and what is allowed."""
