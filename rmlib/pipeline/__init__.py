"""Layer 7: presets, ``make reproduce`` (papermill over the notebooks) and the README report."""
