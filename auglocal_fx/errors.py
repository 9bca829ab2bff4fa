"""The one exception type a user can cause, so the CLIs can print it as one line and exit 2."""


class AugLocalError(ValueError):
    """A problem with the user's input (model, arguments, files).

    The message is a single line naming what is wrong and what to do about it.
    """
