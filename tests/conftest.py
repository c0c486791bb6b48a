"""Test-suite wiring: shared fixtures live in their own modules, one per concern."""

pytest_plugins = ["tests.fixtures_artifacts", "tests.fixtures_kafka"]
