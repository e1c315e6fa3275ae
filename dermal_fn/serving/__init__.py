"""The serving layer above the core: configuration, options, the service singleton, HTTP.

``config`` (the environment, read once into a frozen dataclass), ``options`` (what a request asks
for), ``engines`` (the one place that picks an engine for a file, importing the TensorFlow reference
lazily), ``service`` (the model holder, the inference gate, the answer body), ``http`` (routes and the
error table), ``memory`` (RSS and cgroup limits) and ``logs`` (JSON lines for Cloud Logging).
Imports go down into :mod:`dermal_fn.core`, never up.
"""
