"""Plots as images for MLflow and reports: one headless matplotlib setup for every stage.

    fig, ax = plots.figure((6, 3.5))
    ax.hist(...)
    image = plots.to_image(fig)  # a PIL RGB image; the figure is closed

matplotlib is imported lazily with the Agg backend, so nothing needs a display and importing
a stage does not pay for matplotlib.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any


def figure(figsize: tuple[float, float] = (6, 3.5), **kwargs: Any):
    """A new (figure, axes) on the Agg backend; `kwargs` go to `plt.subplots`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize, **kwargs)


def to_png(fig, path: str | Path | None = None, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (also written to `path` if given); closes the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    data = buf.getvalue()
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return data


def to_image(fig, dpi: int = 110):
    """The figure as a PIL RGB image; closes the figure."""
    from PIL import Image

    return Image.open(io.BytesIO(to_png(fig, dpi=dpi))).convert("RGB")
