"""One base class for errors caused by user input, so every command reports them the same way (no traceback)."""


class DrugprotError(Exception):
    """Bad input, bad config or a refused artifact; the message already says where and what to do."""
