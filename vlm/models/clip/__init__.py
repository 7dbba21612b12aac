"""CLIP (Radford et al. 2021) through open_clip: presets, building, export, loss, zero-shot eval."""
