"""The one error type of model loading."""


class ModelLoadError(ValueError):
    """A model directory cannot be loaded; the message names the file, tensor or option at fault."""
