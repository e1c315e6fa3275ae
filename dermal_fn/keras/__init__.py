"""The Keras side: everything that needs TensorFlow (offline export and the reference backend).

``split`` (cut a model at its Grad-CAM layer, layers to NumPy head ops), ``reference`` (a Keras file
served with TensorFlow and ``tf.GradientTape``: slow, big, the oracle) and ``export`` (load, convert,
verify or refuse, write). TensorFlow is imported inside the functions that need it; the serving path
imports this package only when ``MODEL_URI`` names a Keras file.
"""
