"""The project's own test bed: real images and a real local web, for the demo, tests and benches.

- `digits`: sklearn's handwritten digits as images with captions (clean and noisy).
- `digit_shards`: digit shards written directly, for tests of the stages after ingest.
- `web`: `LocalWeb`, an HTTP server on 127.0.0.1 serving those images and every failure the
  real web has; `media`: the bytes it serves; `url_lists`: URL lists for it, each row carrying
  the status a correct downloader should report.

Nothing in `vlm.data`, `vlm.models` or `vlm.train` depends on it; only demo-scale evaluation
(digit zero-shot, Flamingo k-shot on digits) and the stage helpers that build demo inputs do.
"""
