"""The functions-framework target ``dermal``, shipped inside the package.

``main.py`` in the checkout re-exports it (``functions-framework --target=dermal --source=main.py``);
``dermal-fn serve`` points functions-framework at this file of the installed package. Nothing heavy
happens at import: gunicorn imports it in its master process and forks the worker, so the HTTP
layer (NumPy, Pillow), the model, its interpreter threads and the storage client are all loaded
lazily in the worker, on its first request. The master stays small.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import functions_framework

from dermal_fn.serving import gunicorn_limits
from dermal_fn.serving.logs import setup_logging

if TYPE_CHECKING:
    import flask

setup_logging()
gunicorn_limits.install()  # before functions-framework hands gunicorn its configuration


@functions_framework.http
def dermal(request: flask.Request) -> flask.Response:
    """Predict with Grad-CAM (POST /predict), /health, /memory, /model and the upload page (GET /)."""
    from dermal_fn.serving.http import handle

    return handle(request)
