"""Exceptions that cross layer boundaries."""


class InvalidRequest(ValueError):
    """Bad user input: a parameter out of range, a prompt too long, an unknown model.

    The HTTP edge maps it to a 400 with an OpenAI-style error body. ``param`` names the
    offending field when there is one.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self):
        # NOTE: pickled whole (message and param), so a data-parallel replica's 400 crosses processes intact
        return (self.__class__, (self.message, self.param))


class ModelNotFound(InvalidRequest):
    """A model path or name that does not resolve to local weights."""
