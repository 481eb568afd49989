"""One module per technique, each with `score(...) -> list[dict]`: that technique scored against the organisms'
ground truth, one `_common.line` per score. `benchmarks/groundtruth.py` is the driver and holds the registry
(`TECHNIQUES`); add a technique by adding a module here and an entry there.

The package is imported as `scores`, with `benchmarks/` on `sys.path` (groundtruth.py puts it there), so it needs
no installed `benchmarks` package.
"""
