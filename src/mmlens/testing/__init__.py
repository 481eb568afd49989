"""Helpers for tests, benchmarks and the demo: tiny random models built from configs, never from a hub."""
