"""Screens of the trace explorer: cell drill-down, APRT file browser, help."""
