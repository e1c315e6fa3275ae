"""Tools on top of the other layers: the command line (``python -m dermal_fn``) and ``compare``."""
