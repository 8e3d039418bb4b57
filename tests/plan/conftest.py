"""The plan tests use the explorer's demo pair."""

from tests.tui.conftest import demo_pair  # noqa: F401
