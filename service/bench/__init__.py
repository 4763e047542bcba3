"""`icr bench`: see :mod:`service.bench.command` and docs/performance.md.

The package itself imports nothing heavy, so its process helpers (:mod:`service.bench.processes`)
serve tests and tools that never run a network.
"""
