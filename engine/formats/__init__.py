"""Model containers. `open_model(path)` dispatches on the file; each module yields a `Model`."""
