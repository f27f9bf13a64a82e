"""Plots of labelled results (plotly heatmaps; HTML, PNG with kaleido)."""

from omnilens.viz.heatmap import heatmap, png_available, save

__all__ = ["heatmap", "png_available", "save"]
