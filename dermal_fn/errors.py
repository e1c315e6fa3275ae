"""The exceptions dermal_fn raises, one family.

    DermalError
    ├── RequestError              the client sent something we cannot serve (HTTP 4xx)
    │   ├── InvalidRequest        unreadable request: malformed multipart, JSON or base64
    │   ├── InvalidImage          the bytes are not a decodable image (or a decompression bomb)
    │   ├── UnsupportedMediaType  a type we do not decode (SVG, PDF, a video, ...)
    │   ├── PayloadTooLarge       the body is over MAX_UPLOAD_MB
    │   │   └── ImageTooLarge     the image would decode to more bytes than the budget (MAX_DECODE_MB)
    │   ├── InvalidOption         top_k, class, score or gradcam out of range or of the wrong type
    │   ├── MethodNotAllowed      a route asked with the wrong method
    │   ├── NotFound              no such route
    │   ├── Unauthorized          API_KEY is set and the bearer token is missing or wrong
    │   └── RequestTimeout        the body did not arrive within BODY_TIMEOUT_S (a slow client)
    ├── ServiceUnavailable        try again later (HTTP 503 with Retry-After)
    │   ├── ModelUnavailable      the model could not be fetched or loaded (or is still loading)
    │   │   └── LoadTimedOut      fetching and loading took longer than MODEL_LOAD_TIMEOUT_S
    │   ├── Overloaded            the inference queue is full
    │   └── InsufficientMemory    decoding this image now would not fit in the memory left
    ├── ConfigError               an environment variable has a value we cannot use
    │   └── BackendMissing        MODEL_URI is a Keras file and TensorFlow/Keras is not installed
    ├── DatasetError              a folder of images is not what a command needs (calibrate, evaluate)
    ├── BundleError               a bundle file is malformed or of an unknown version
    │   └── ModelCrashed          loading it crashed the worker before (its message is safe to show anyone)
    └── ExportError               a Keras model cannot be exported faithfully
        └── UnsupportedLayer      the head holds a layer the NumPy head cannot differentiate

The HTTP layer (dermal_fn.serving.http) maps each class to a status and an error code in one table.
Messages say what was expected and what was found; they never contain image bytes.
"""

from __future__ import annotations


class DermalError(Exception):
    """Base of every error raised by dermal_fn.

    ``str(exc)`` is what any client may read; ``detail`` (optional) is for the logs and for callers
    who showed the API key: storage paths, endpoints, the cause's own text. ``says_why``: when a model
    fails to load with this error, its message is safe and useful to everyone (no path or endpoint),
    so ``/health`` and the 503 quote it instead of only naming the error's class.
    """

    says_why: bool = False

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail


class RequestError(DermalError):
    """The client sent something we cannot serve."""


class InvalidRequest(RequestError):
    """The request itself could not be read."""


class InvalidImage(RequestError):
    """The upload is not an image we can decode."""


class UnsupportedMediaType(RequestError):
    """The upload is of a type we do not decode."""


class PayloadTooLarge(RequestError):
    """The body is larger than MAX_UPLOAD_MB."""


class ImageTooLarge(PayloadTooLarge):
    """The image would decode to more bytes than the decode budget allows."""


class InvalidOption(RequestError):
    """An option is out of range or of the wrong type."""


class MethodNotAllowed(RequestError):
    """The route exists but not for this method."""

    def __init__(self, message: str, *, allowed: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.allowed = allowed


class NotFound(RequestError):
    """No such route."""


class Unauthorized(RequestError):
    """A bearer token is required and was missing or wrong."""


class RequestTimeout(RequestError):
    """The request body did not arrive in time (a slow or stalled client)."""


class ServiceUnavailable(DermalError):
    """Temporarily unable to answer; the client should retry (after ``retry_after_s``)."""

    retry_after_s: int = 5

    def __init__(self, message: str, *, detail: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message, detail=detail)
        if retry_after_s is not None:
            self.retry_after_s = max(1, int(retry_after_s))


class ModelUnavailable(ServiceUnavailable):
    """The model could not be fetched or loaded."""

    retry_after_s = 10


class LoadTimedOut(ModelUnavailable):
    """Fetching and loading the model took longer than MODEL_LOAD_TIMEOUT_S; the load was abandoned."""

    says_why = True


class Overloaded(ServiceUnavailable):
    """The inference queue is full."""

    retry_after_s = 2


class InsufficientMemory(ServiceUnavailable):
    """Decoding this image now would not fit in the memory the container has left."""

    retry_after_s = 5


class ConfigError(DermalError):
    """A configuration value cannot be used."""


class BackendMissing(ConfigError):
    """The model is a Keras file and this server has no TensorFlow/Keras to serve it with."""

    says_why = True


class DatasetError(DermalError):
    """A folder of images is not what the command needs: missing, empty, or its classes do not match."""


class BundleError(DermalError):
    """A bundle file is malformed or of an unknown version."""


class ModelCrashed(BundleError):
    """Loading this model crashed the worker process before (a crash signal); it is not loaded again until it changes."""

    says_why = True


class ExportError(DermalError):
    """A Keras model cannot be exported faithfully."""


class UnsupportedLayer(ExportError):
    """A head layer that the NumPy head cannot run forward and backward."""
