"""The base of tunedag's error types: problems a user can fix (config, data, files, models).

Stage scripts print these as one line naming the key, file or row at fault; anything else is a
bug and keeps its traceback.
"""


class TunedagError(Exception):
    """A problem with the user's input or environment, with a message that says what to fix."""
