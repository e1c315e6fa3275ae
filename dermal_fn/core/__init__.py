"""The core the 512 MB worker runs: no TensorFlow, no settings, no HTTP.

``head`` (NumPy forward/backward), ``gradcam`` (the numbers), ``bundle`` (the file format),
``imaging`` (decoding within a byte budget, model input), ``render`` (colours, PNG) and ``engine``
(LiteRT backbone + NumPy head). Modules here import only each other, ``dermal_fn.errors``, NumPy,
Pillow and LiteRT; nothing here knows the service, the environment or Keras.
"""
