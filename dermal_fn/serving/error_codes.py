"""The one table from errors to HTTP statuses and error codes (no web framework: batch rows use it too)."""

from __future__ import annotations

from dermal_fn import errors

# error class -> (status, code); looked up along the class's MRO, most specific first
ERROR_TABLE: dict[type[errors.DermalError], tuple[int, str]] = {
    errors.InvalidRequest: (400, "invalid_request"),
    errors.InvalidImage: (400, "invalid_image"),
    errors.Unauthorized: (401, "unauthorized"),
    errors.RequestTimeout: (408, "request_timeout"),
    errors.NotFound: (404, "not_found"),
    errors.MethodNotAllowed: (405, "method_not_allowed"),
    errors.ImageTooLarge: (413, "image_too_large"),
    errors.PayloadTooLarge: (413, "payload_too_large"),
    errors.UnsupportedMediaType: (415, "unsupported_media_type"),
    errors.InvalidOption: (422, "invalid_option"),
    errors.RequestError: (400, "invalid_request"),
    errors.ModelUnavailable: (503, "model_unavailable"),
    errors.Overloaded: (503, "overloaded"),
    errors.InsufficientMemory: (503, "insufficient_memory"),
    errors.ServiceUnavailable: (503, "unavailable"),
    errors.ConfigError: (503, "misconfigured"),
    errors.DermalError: (500, "internal_error"),
}


def status_for(exc: errors.DermalError) -> tuple[int, str]:
    """The HTTP status and error code for an exception, from ERROR_TABLE."""
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return 500, "internal_error"
