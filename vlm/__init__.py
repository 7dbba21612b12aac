"""vlm: web image-text data -> BLIP CapFilt -> CLIP and Flamingo pretraining, on Ray."""

__version__ = "0.1.0"
