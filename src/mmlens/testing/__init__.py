"""Helpers for tests and benchmarks: tiny random models built from configs, never from a hub. Run-time code never imports this package."""
