"""functions-framework entry point: ``functions-framework --target=dermal --source=main.py``.

Nothing heavy happens at import (gunicorn imports this file in its master process, then forks):
the model is fetched and loaded lazily, once per worker process, on the first request.
"""

from __future__ import annotations

import flask
import functions_framework

from dermal_fn.http import handle
from dermal_fn.logs import setup_logging

setup_logging()


@functions_framework.http
def dermal(request: flask.Request) -> flask.Response:
    """Predict with Grad-CAM (POST /predict), /health, /memory and the upload page (GET /)."""
    return handle(request)
