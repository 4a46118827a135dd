"""Shared fixtures live in tests/support/fixtures.py; unit tests are in tests/unit/ (in-process,
`make test-fast`), end-to-end runs with real worker processes in tests/e2e/."""

pytest_plugins = ["tests.support.fixtures"]
