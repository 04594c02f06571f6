"""What a reader of users' data returns: images and raw labels of one file or folder (a pool).

Both readers (:mod:`guft_jax.data.npz`, :mod:`guft_jax.data.folder`) return :class:`Pool` objects;
:mod:`guft_jax.data.labels` encodes their labels and :mod:`guft_jax.data.splits` splits them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

# npz and folders say the same when they scale 16-bit pixels (uint16 arrays, 16-bit PNG/TIFF).
SIXTEEN_BIT_NOTE = "16-bit pixels scaled to 8 bits (x 255/65535)"


class Pool(NamedTuple):
    """Images and labels read from one file or folder, before splitting.

    Attributes:
      images: uint8 ``(N, H, W, C)`` (C in {1, 3, 4}) or a list of ``(H, W, C)`` of varying size.
      labels: the labels as read (ints or strings, not yet remapped).
      class_names: names per integer label when the data names them (folder names, an npz
        ``class_names`` array), else ``None``.
      notes: what was converted or ignored, one sentence each.
      info: counts for the run report (``skipped_files``, ``ignored_files``, ...).
    """

    images: Any
    labels: np.ndarray
    class_names: tuple[str, ...] | None
    notes: tuple[str, ...]
    info: dict
