"""The one error type the GGUF export raises for bad input."""

from tunedag.errors import TunedagError


class GGUFExportError(TunedagError, ValueError):
    """A model folder or request the GGUF export cannot turn into a working file.

    The message names what is wrong (the architecture, the file, the tensor, the
    output type) and what is supported, so the user can act on it.
    """
