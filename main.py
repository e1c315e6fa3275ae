"""functions-framework entry point: ``functions-framework --target=dermal --source=main.py``.

Nothing heavy happens at import: gunicorn imports this file in its master process and then forks the
worker, so the HTTP layer (NumPy, Pillow), the model, its interpreter threads and the storage client
are all loaded lazily in the worker, on its first request. The master stays small.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import functions_framework

from dermal_fn.serving.logs import setup_logging

if TYPE_CHECKING:
    import flask

setup_logging()


@functions_framework.http
def dermal(request: flask.Request) -> flask.Response:
    """Predict with Grad-CAM (POST /predict), /health, /memory and the upload page (GET /)."""
    from dermal_fn.serving.http import handle

    return handle(request)
