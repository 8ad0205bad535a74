"""imer pipeline: CLI, feature stores, cache and the stage runner."""

__version__ = "0.1.0"
