"""apr-tui: the Textual trace explorer and its command line."""

__version__ = "0.1.0"
