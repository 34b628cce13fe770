"""The one error type the GGUF export raises for bad input."""


class GGUFExportError(ValueError):
    """A model folder or request the GGUF export cannot turn into a working file.

    The message names what is wrong (the architecture, the file, the tensor, the
    output type) and what is supported, so the user can act on it.
    """
