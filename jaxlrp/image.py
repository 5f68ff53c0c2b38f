"""Heatmaps for relevance: diverging colour maps centred at zero, overlays, grids and PNG output.

Everything here is plain NumPy on the host (JAX arrays are converted with ``np.asarray``), so rendering never
triggers compilation. Only :func:`save_png` needs an optional dependency (Pillow, from the ``plots`` extra).

Layouts: a single map is ``HW`` or ``HWC``; a batch is ``NHWC``. The channel axis, where there is one, is last.

Example:
  >>> import numpy as np
  >>> from jaxlrp import image
  >>> relevance = np.zeros((2, 8, 8, 1)); relevance[:, 2, 3] = 1.0; relevance[:, 5, 5] = -0.5
  >>> rgb = image.heatmap(relevance)          # (2, 8, 8, 3), floats in [0, 1]
  >>> rgb.shape
  (2, 8, 8, 3)
  >>> canvas = image.grid(list(rgb), ncols=2, scale=4)
  >>> canvas.shape
  (32, 65, 3)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

__all__ = ["COLORMAPS", "colormap", "heatmap", "overlay", "grid", "save_png"]

# Piecewise-linear colour maps on [0, 1]: (positions, RGB colours). Position 0.5 is relevance zero.
COLORMAPS: dict[str, tuple[tuple[float, ...], tuple[tuple[float, float, float], ...]]] = {
  # blue -> white -> red (Zennit's and matplotlib's "bwr").
  "bwr": ((0.0, 0.5, 1.0), ((0.0, 0.0, 1.0), (1.0, 1.0, 1.0), (1.0, 0.0, 0.0))),
  # cyan -> blue -> black -> red -> yellow -> white (Zennit's "coldnhot": '0ff,00f,80:000,f00,ff0,fff').
  "coldnhot": (
    (0.0, 0.25, 0.5, 2 / 3, 5 / 6, 1.0),
    (
      (0.0, 1.0, 1.0),
      (0.0, 0.0, 1.0),
      (0.0, 0.0, 0.0),
      (1.0, 0.0, 0.0),
      (1.0, 1.0, 0.0),
      (1.0, 1.0, 1.0),
    ),
  ),
}

Colormap = str | Callable[[np.ndarray], np.ndarray]


def colormap(values, cmap: Colormap = "bwr") -> np.ndarray:
  """Maps values in ``[0, 1]`` to RGB with a named piecewise-linear colour map.

  Args:
    values: array of any shape; values outside ``[0, 1]`` are clipped.
    cmap: a name in :data:`COLORMAPS` (``"bwr"`` or ``"coldnhot"``), or a callable taking an array of values in
      ``[0, 1]`` and returning RGB in a new trailing axis of size 3.

  Returns:
    float32 array of shape ``values.shape + (3,)`` with entries in ``[0, 1]``.

  Example:
    >>> from jaxlrp.image import colormap
    >>> colormap([0.0, 0.5, 1.0], "bwr").tolist()
    [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
    >>> colormap(0.5, "coldnhot").tolist()
    [0.0, 0.0, 0.0]
  """
  values = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
  if callable(cmap):
    return np.clip(np.asarray(cmap(values), dtype=np.float32), 0.0, 1.0)
  if cmap not in COLORMAPS:
    raise ValueError(f"Unknown colour map {cmap!r}; choose one of {sorted(COLORMAPS)} or pass a callable.")
  positions, colours = COLORMAPS[cmap]
  colours = np.asarray(colours, dtype=np.float32)
  channels = [np.interp(values, positions, colours[:, c]) for c in range(3)]
  return np.stack(channels, axis=-1).astype(np.float32)


def _as_float(array) -> np.ndarray:
  array = np.asarray(array)
  if array.dtype == np.uint8:
    return array.astype(np.float32) / 255.0
  return array.astype(np.float32)


def _reduce(relevance: np.ndarray, reduce_channels: str) -> np.ndarray:
  """HW / HWC / NHWC -> HW / NHW."""
  if relevance.ndim == 2:
    return relevance
  if relevance.ndim not in (3, 4):
    raise ValueError(
      f"Expected relevance of shape HW, HWC or NHWC, got shape {relevance.shape}. "
      "For a batch of single-channel maps NHW, add a trailing channel axis: relevance[..., None]."
    )
  if reduce_channels == "sum":
    return relevance.sum(axis=-1)
  if reduce_channels == "mean":
    return relevance.mean(axis=-1)
  raise ValueError(f"reduce_channels must be 'sum' or 'mean', got {reduce_channels!r}.")


def heatmap(
  relevance,
  *,
  cmap: Colormap = "bwr",
  symmetric: bool = True,
  reduce_channels: str = "sum",
  level: float = 1.0,
) -> np.ndarray:
  """Renders relevance as RGB with a diverging colour map centred at zero.

  Channels are reduced first (relevance of an RGB pixel is the sum over its channels). With ``symmetric=True``
  each image is scaled by its own largest magnitude:

  .. math::
      v = \\tfrac12 \\left(1 + \\mathrm{clip}\\left(\\text{level} \\cdot R / \\max |R|,\\ -1,\\ 1\\right)\\right)

  so zero relevance maps to the colour map's centre (white for ``"bwr"``, black for ``"coldnhot"``), positive
  relevance to the upper half (red / hot) and negative to the lower half (blue / cold). An all-zero map renders
  as the centre colour. With ``symmetric=False`` each image is min-max scaled to ``[0, 1]`` instead (zero is then
  no longer centred).

  Args:
    relevance: NumPy or JAX array, ``HW``, ``HWC`` or ``NHWC`` (channels last).
    cmap: ``"bwr"`` (blue-white-red), ``"coldnhot"`` (cyan-blue-black-red-yellow-white, as in Zennit), or a
      callable, see :func:`colormap`.
    symmetric: scale by ``max |R|`` per image (zero centred) rather than min-max.
    reduce_channels: ``"sum"`` or ``"mean"`` over the trailing channel axis of ``HWC``/``NHWC`` input.
    level: gain applied after scaling; values above 1 saturate the largest relevances and bring out weak ones.

  Returns:
    float32 RGB in ``[0, 1]``: shape ``(H, W, 3)`` for ``HW``/``HWC`` input, ``(N, H, W, 3)`` for ``NHWC``.

  Example:
    >>> import numpy as np
    >>> from jaxlrp.image import heatmap
    >>> r = np.array([[-2.0, 0.0, 1.0]])          # HW
    >>> heatmap(r).round(2).tolist()              # blue, white, light red (half of max |R|)
    [[[0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.5, 0.5]]]
    >>> heatmap(r, cmap="coldnhot")[0, 1].tolist()  # zero is black in "coldnhot"
    [0.0, 0.0, 0.0]
  """
  maps = _reduce(_as_float(relevance), reduce_channels)
  batched = maps.ndim == 3
  if not batched:
    maps = maps[None]
  if symmetric:
    scale = np.abs(maps).max(axis=(1, 2), keepdims=True)
    scaled = maps / np.where(scale > 0, scale, 1.0)
    values = 0.5 * (1.0 + np.clip(level * scaled, -1.0, 1.0))
  else:
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    values = np.clip(level * (maps - low) / np.where(span > 0, span, 1.0), 0.0, 1.0)
  rgb = colormap(values, cmap)
  return rgb if batched else rgb[0]


def _as_rgb_image(image) -> np.ndarray:
  """HW / HWC / NHWC image -> float RGB in [0, 1], min-max scaled per image."""
  image = _as_float(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim not in (3, 4) or image.shape[-1] not in (1, 3):
    raise ValueError(f"Expected an image HW, HWC or NHWC with 1 or 3 channels, got shape {image.shape}.")
  axes = (-3, -2, -1)
  low = image.min(axis=axes, keepdims=True)
  span = image.max(axis=axes, keepdims=True) - low
  image = (image - low) / np.where(span > 0, span, 1.0)
  return np.broadcast_to(image, image.shape[:-1] + (3,))


def overlay(image, relevance, *, alpha: float = 0.5, **heatmap_kwargs) -> np.ndarray:
  """Blends a heatmap of ``relevance`` over ``image``: ``(1 - alpha) * image + alpha * heatmap(relevance)``.

  Args:
    image: ``HW``, ``HWC`` or ``NHWC`` with 1 or 3 channels, any value range: each image is min-max scaled to
      ``[0, 1]`` (so normalised network inputs display correctly); grey images are repeated to RGB.
    relevance: relevance with the same spatial shape (and batch size), as accepted by :func:`heatmap`.
    alpha: weight of the heatmap, in ``[0, 1]``.
    **heatmap_kwargs: passed to :func:`heatmap` (``cmap``, ``symmetric``, ``reduce_channels``, ``level``).

  Returns:
    float32 RGB in ``[0, 1]`` of shape ``(H, W, 3)`` or ``(N, H, W, 3)``.

  Example:
    >>> import numpy as np
    >>> from jaxlrp.image import overlay
    >>> img = np.linspace(0, 1, 16).reshape(4, 4)
    >>> rel = np.zeros((4, 4)); rel[0, 0] = 1.0
    >>> out = overlay(img, rel, alpha=0.5)
    >>> out.shape, float(out.min()) >= 0.0, float(out.max()) <= 1.0
    ((4, 4, 3), True, True)
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
  heat = heatmap(relevance, **heatmap_kwargs)
  rgb = _as_rgb_image(image)
  if rgb.shape != heat.shape:
    raise ValueError(
      f"image {np.shape(image)} and relevance {np.shape(relevance)} render to different shapes "
      f"{rgb.shape} and {heat.shape}."
    )
  return ((1.0 - alpha) * rgb + alpha * heat).astype(np.float32)


def grid(
  images: Sequence | np.ndarray,
  ncols: int,
  *,
  pad: int = 1,
  pad_value: float = 1.0,
  scale: int = 1,
) -> np.ndarray:
  """Tiles images row by row into one array.

  Args:
    images: a sequence of ``HW``/``HWC`` arrays, or one ``NHWC``/``NHW`` array. All tiles share ``H`` and ``W``;
      grey (1-channel or ``HW``) tiles are repeated to RGB when other tiles are RGB. uint8 tiles become floats in
      ``[0, 1]``.
    ncols: tiles per row; the number of rows is ``ceil(N / ncols)`` and missing tiles are ``pad_value``.
    pad: pixels of ``pad_value`` between neighbouring tiles (not around the border).
    pad_value: fill value for padding and missing tiles.
    scale: integer nearest-neighbour upscaling of every tile (padding is not scaled), so 8x8 inputs stay readable.

  Returns:
    float32 array of shape ``(rows * H * scale + (rows - 1) * pad, ncols * W * scale + (ncols - 1) * pad, C)``,
    with ``C`` 3 if any tile is RGB, else 1.

  Example:
    >>> import numpy as np
    >>> from jaxlrp.image import grid
    >>> tiles = [np.zeros((8, 8)), np.ones((8, 8, 3)), np.zeros((8, 8, 1))]
    >>> grid(tiles, ncols=2, pad=2, scale=3).shape
    (50, 50, 3)
  """
  if ncols < 1 or pad < 0 or scale < 1:
    raise ValueError(f"Need ncols >= 1, pad >= 0 and scale >= 1; got ncols={ncols}, pad={pad}, scale={scale}.")
  tiles = [_as_float(t) for t in images]
  if not tiles:
    raise ValueError("grid() needs at least one image.")
  tiles = [t[..., None] if t.ndim == 2 else t for t in tiles]
  shapes = {t.shape[:2] for t in tiles}
  if any(t.ndim != 3 or t.shape[-1] not in (1, 3) for t in tiles) or len(shapes) != 1:
    raise ValueError(
      "grid() needs tiles of one spatial shape, each HW or HWC with 1 or 3 channels; got shapes "
      f"{[t.shape for t in tiles]}."
    )
  channels = max(t.shape[-1] for t in tiles)
  height, width = (s * scale for s in tiles[0].shape[:2])
  nrows = -(-len(tiles) // ncols)
  out = np.full(
    (nrows * height + (nrows - 1) * pad, ncols * width + (ncols - 1) * pad, channels),
    pad_value,
    dtype=np.float32,
  )
  for i, tile in enumerate(tiles):
    row, col = divmod(i, ncols)
    tile = np.repeat(np.repeat(tile, scale, axis=0), scale, axis=1)
    y, x = row * (height + pad), col * (width + pad)
    out[y : y + height, x : x + width] = tile  # broadcasts grey tiles to RGB
  return out


def save_png(array, path: str | os.PathLike) -> Path:
  """Writes an image array to a PNG file (needs Pillow: ``pip install "jaxlrp[plots]"``).

  Args:
    array: ``HW``, ``HWC`` with 1, 3 or 4 channels; floats in ``[0, 1]`` (clipped, rounded to 8 bits) or uint8.
    path: the file to write; missing parent directories are created.

  Returns:
    The path written, as a :class:`pathlib.Path`.

  Example:
    >>> import os, tempfile
    >>> import numpy as np
    >>> from jaxlrp.image import heatmap, save_png
    >>> path = save_png(heatmap(np.eye(4) - 0.5), os.path.join(tempfile.mkdtemp(), "eye.png"))
    >>> path.name, path.stat().st_size > 0
    ('eye.png', True)
  """
  try:
    from PIL import Image
  except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
      "jaxlrp.image.save_png needs Pillow. Install it with the plots extra: pip install \"jaxlrp[plots]\" "
      "(or pip install pillow)."
    ) from err
  array = np.asarray(array)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
    raise ValueError(f"save_png expects HW or HWC with 1, 3 or 4 channels, got shape {array.shape}.")
  if array.dtype != np.uint8:
    if array.dtype.kind not in "fb" and not array.dtype.name.startswith(("bfloat", "float")):  # ml_dtypes too
      raise ValueError(f"save_png expects floats in [0, 1] or uint8, got dtype {array.dtype}.")
    array = np.round(np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.ascontiguousarray(array)).save(path, format="PNG", optimize=True)
  return path
