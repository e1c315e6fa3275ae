"""A minimal Django app that calls dermal-fn from its view: an upload, the labels, the heatmap, the warnings."""
