"""Models: CLIP (open_clip), BLIP (transformers), Flamingo (ours)."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile

from vlm import storage


@functools.lru_cache(maxsize=16)
def local_copy(path: str) -> str:
    """A local path for a model directory or file given as a path, hub id or URL.

    Loaders that read files from disk (transformers' `from_pretrained`, open_clip's `load_state_dict`)
    get the path itself, or for a URL (s3://...) a download kept for this process's life: a training
    worker builds its model again after a restart, its data workers build the tokenizer per process.
    """
    if not storage.is_url(path):
        return path
    tmp = tempfile.mkdtemp(prefix="vlm-model-")
    atexit.register(shutil.rmtree, tmp, True)
    return str(storage.download(path, tmp))
