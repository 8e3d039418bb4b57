"""apr-tui's engine: model files, the traced forward pass, APRT stage files and diff statistics.

Pure computation and file formats. Never imports textual or rich, never prints: usable from a
notebook or a script with only numpy (and optionally CuPy) installed.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
