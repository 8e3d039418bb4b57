"""The noise tests use the explorer's small demo pair."""

from tests.tui.conftest import demo_pair  # noqa: F401
