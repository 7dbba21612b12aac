"""BLIP / BLIP-2 (Li et al. 2022, 2023) through transformers: the CapFilt captioner and filter.

`config` (settings and size presets; no heavy imports), `build` (build / load / export),
`captioner` (batched inference), `matching` (ITC / ITM by parts), `losses` (training objectives).
"""
