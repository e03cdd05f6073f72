"""Test fixtures: tiny models and reference implementations. Never imported by the runtime."""
