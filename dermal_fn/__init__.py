"""dermal-fn: a Keras skin-image classifier with Grad-CAM, served without TensorFlow."""

from __future__ import annotations

__version__ = "0.1.0"
