"""The errors a user can cause (a bad config key, a missing folder, an
unreadable image, an unusable run folder or checkpoint). Every command
reports a `UserError` in one line, without a traceback, and exits with 2;
anything else is a bug and keeps its traceback. This module is a leaf:
every part of the project can raise these without importing any other."""


class UserError(Exception):
    """What the user can fix: the message says what to change."""


class DataError(UserError, ValueError):
    """The data: a missing or empty folder, too many unreadable images."""
