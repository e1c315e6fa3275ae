"""functions-framework entry point: ``functions-framework --target=dermal --source=main.py``.

The target lives in the package (:mod:`dermal_fn.serving.function`), so an installed ``dermal-fn``
serves the same function; importing it loads nothing heavy (gunicorn imports this file in its
master process and forks the worker afterwards).
"""

from __future__ import annotations

from dermal_fn.serving.function import dermal

__all__ = ["dermal"]
