"""Models: CLIP (open_clip), BLIP (transformers), Flamingo (ours)."""
