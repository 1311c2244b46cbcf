"""Errors a user can cause with their data (a missing folder, an unreadable
image). The command line reports them in one line, without a traceback."""


class DataError(ValueError):
    pass
