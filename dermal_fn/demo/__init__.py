"""The demo model: synthetic dermoscopy-like images and a small Keras CNN trained on them."""
