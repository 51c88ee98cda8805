"""The one error type of dataset loading."""


class DataError(ValueError):
    """A dataset that cannot be loaded; the message says how to fix it."""
