"""Widgets of the trace explorer: the stage grid and the small views around it."""
