"""manifoldgd's Ray stages and command line: images -> latents -> centroids -> samples -> report."""

__version__ = "0.1.0"
