"""Distill presets shipped as package data: ``--config imagenet1k_ipc50`` loads ``imagenet1k_ipc50.yaml``
from here (see ``pipeline.config.load_yaml``)."""
