"""Batch scoring on Apache Beam: ``dermal-fn batch`` (needs ``dermal-fn[batch]``).

``handler`` is the RunInference model handler (a bundle served as the function serves it: the
same decoding, model, Grad-CAM and answer), ``pipeline`` reads the photos, runs it and writes JSON
lines, one row per input file.
"""
