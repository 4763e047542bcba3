"""`icr bench`: see :mod:`service.bench.command` and docs/performance.md."""

from service.bench.command import register

__all__ = ["register"]
