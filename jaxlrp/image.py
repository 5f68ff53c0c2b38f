"""Heatmaps for relevance: diverging colour maps centred at zero, overlays, grids, PNG output, and token heatmaps.

Everything here is plain NumPy on the host (JAX arrays are converted with ``np.asarray``), so rendering never
triggers compilation. Only :func:`save_png`, :func:`show` (inline display in notebooks) and :func:`render_text`
need an optional dependency (Pillow, from the ``plots`` extra).

Layouts: a single map is ``HW`` or ``HWC``; a batch is ``NHWC``. The channel axis, where there is one, is last.

Text: :func:`text_heatmap` colours tokens by their relevance with the same colour maps and scaling, as HTML (shown
inline in Jupyter, saved with :meth:`TextHeatmap.save` / :func:`save_html`) or as an image (:func:`render_text`,
which needs Pillow and uses matplotlib's bundled DejaVu font where matplotlib is installed).

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

import dataclasses
import html as _html
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

__all__ = [
  "COLORMAPS", "colormap", "heatmap", "overlay", "grid", "save_png", "Picture", "show",
  "TextHeatmap", "text_heatmap", "token_relevance", "save_html", "render_text",
]

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


def _to_uint8(array, owner: str) -> np.ndarray:
  """`HW` / `HWC` (1, 3 or 4 channels) floats in [0, 1] or uint8 -> a contiguous uint8 array Pillow accepts."""
  array = np.asarray(array)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
    raise ValueError(f"{owner} expects HW or HWC with 1, 3 or 4 channels, got shape {array.shape}.")
  if array.dtype != np.uint8:
    if array.dtype.kind not in "fb" and not array.dtype.name.startswith(("bfloat", "float")):  # ml_dtypes too
      raise ValueError(f"{owner} expects floats in [0, 1] or uint8, got dtype {array.dtype}.")
    array = np.round(np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
  return np.ascontiguousarray(array)


def _pil(owner: str):
  try:
    from PIL import Image
  except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
      f"jaxlrp.image.{owner} needs Pillow. Install it with the plots extra: pip install \"jaxlrp[plots]\" "
      "(or pip install pillow)."
    ) from err
  return Image


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
  array = _to_uint8(array, "save_png")
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  _pil("save_png").fromarray(array).save(path, format="PNG", optimize=True)
  return path


@dataclasses.dataclass(frozen=True)
class Picture:
  """An image shown inline by Jupyter (its `_repr_png_`), made by :func:`show`.

  Attributes:
    pixels: the ``HW`` or ``HWC`` uint8 array.
  """

  pixels: np.ndarray

  def png(self) -> bytes:
    """The PNG encoding of :attr:`pixels`."""
    import io

    buffer = io.BytesIO()
    _pil("show").fromarray(self.pixels).save(buffer, format="PNG")
    return buffer.getvalue()

  def _repr_png_(self) -> bytes:  # Jupyter renders this inline
    return self.png()

  def save(self, path: str | os.PathLike) -> Path:
    """Writes the picture to a PNG file (as :func:`save_png`)."""
    return save_png(self.pixels, path)


def show(array, *, scale: int = 1) -> Picture:
  """An image array (a heatmap, an overlay, a grid) as a :class:`Picture` that notebooks display inline.

  The last expression of a Jupyter cell is rendered; elsewhere call ``IPython.display.display(show(...))``.
  Needs Pillow to encode the PNG (the ``plots`` extra).

  Args:
    array: ``HW``, ``HWC`` with 1, 3 or 4 channels; floats in ``[0, 1]`` or uint8 (e.g. from :func:`heatmap`,
      :func:`overlay` or :func:`grid`).
    scale: an integer upsampling factor (nearest neighbour), for small maps such as 8 x 8 digits.

  Example:
    >>> import numpy as np
    >>> from jaxlrp import image
    >>> picture = image.show(image.heatmap(np.eye(4) - 0.5), scale=8)
    >>> picture.pixels.shape, picture.pixels.dtype
    ((32, 32, 3), dtype('uint8'))
    >>> picture._repr_png_()[:4]
    b'\\x89PNG'
  """
  if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
    raise ValueError(f"show: scale must be an int >= 1, got {scale!r}.")
  pixels = _to_uint8(array, "show")
  pixels = np.repeat(np.repeat(pixels, scale, axis=0), scale, axis=1)
  return Picture(pixels)


# ---- text -------------------------------------------------------------------------------------------------------

# Tokens that stand alone when subwords are merged: [CLS], [SEP], [PAD], <s>, </s>, <|endoftext|>, ...
_SPECIAL_TOKEN = re.compile(r"^(\[[A-Za-z_]+\]|<\|?/?[A-Za-z_]*\|?>)$")
_WORD_START = ("\u0120", "\u2581")  # "Ġ" (GPT-2 byte-level BPE, RoBERTa), "▁" (SentencePiece)


def token_relevance(relevance, axis: int = -1) -> np.ndarray:
  """Relevance per token: the sum over the hidden units of each token's embedding.

  LRP is conservative, so a token's relevance is the sum of the relevance of its embedding's entries.

  Args:
    relevance: NumPy or JAX array, e.g. ``[T, D]`` or ``[B, T, D]`` (the relevance of input embeddings).
    axis: the hidden axis to sum over.

  Returns:
    float32 NumPy array with ``axis`` removed.

  Example:
    >>> import numpy as np
    >>> from jaxlrp.image import token_relevance
    >>> token_relevance(np.array([[[1.0, 2.0], [-1.0, 0.5]]])).tolist()   # [B=1, T=2, D=2] -> [1, 2]
    [[3.0, -0.5]]
  """
  return np.asarray(relevance, dtype=np.float32).sum(axis=axis)


def _merge_subwords(tokens: list[str], values: np.ndarray) -> tuple[list[str], np.ndarray, list[list[int]]]:
  """Groups subword pieces into words; returns the words, their summed relevance and the piece indices."""
  word_start = any(t.startswith(_WORD_START) for t in tokens)  # else WordPiece ("##" continues a word)
  words, groups = [], []
  after_special = True
  for i, token in enumerate(tokens):
    special = bool(_SPECIAL_TOKEN.match(token))
    if word_start:
      continues = not token.startswith(_WORD_START)
      text = token[1:] if not continues else token
    else:
      continues = token.startswith("##") and len(token) > 2
      text = token[2:] if continues else token
    if continues and not special and not after_special and words:
      words[-1] += text
      groups[-1].append(i)
    else:
      words.append(text)
      groups.append([i])
    after_special = special
  return words, np.array([values[g].sum() for g in groups], np.float32), groups


def _hex(rgb) -> str:
  return "#" + "".join(f"{int(round(float(c) * 255)):02x}" for c in rgb)


def _text_colour(rgb) -> np.ndarray:
  """Black text on light backgrounds, white on dark ones (Rec. 709 luma)."""
  luma = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]
  return np.ones(3, np.float32) if luma < 0.5 else np.zeros(3, np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class TextHeatmap:
  """Tokens coloured by relevance; see :func:`text_heatmap`.

  Attributes:
    tokens: the displayed tokens (words when subwords were merged).
    relevance: float32 ``[N]``, the relevance of each displayed token (summed over merged pieces).
    colors: float32 ``[N, 3]``, background RGB in ``[0, 1]`` of each token.
    html: an HTML fragment (one ``<div>`` of ``<span>`` elements); also ``str(heatmap)``.
    label: an optional caption shown before the tokens.
  """

  tokens: tuple[str, ...]
  relevance: np.ndarray
  colors: np.ndarray
  html: str
  label: str | None = None

  def __str__(self) -> str:
    return self.html

  def _repr_html_(self) -> str:  # Jupyter renders this inline
    return self.html

  def save(self, path: str | os.PathLike, *, title: str = "jaxlrp relevance") -> Path:
    """Writes a standalone HTML page; see :func:`save_html`."""
    return save_html([self], path, title=title)

  def render(self, **kwargs) -> np.ndarray:
    """The heatmap as an RGB image; see :func:`render_text`."""
    return render_text([self], **kwargs)


def text_heatmap(
  tokens: Sequence[str],
  relevance,
  *,
  cmap: Colormap = "bwr",
  merge_subwords: bool = False,
  vmax: float | None = None,
  level: float = 1.0,
  label: str | None = None,
) -> TextHeatmap:
  """Colours tokens by their relevance, as HTML, with a diverging colour map centred at zero.

  Colours follow :func:`heatmap`: ``v = (1 + clip(level * R / vmax, -1, 1)) / 2`` with ``vmax = max |R|`` over the
  displayed tokens by default, so zero is the colour map's centre (white for ``"bwr"``), the most positive token
  the upper end (red) and the most negative the lower end (blue). Each token becomes a ``<span>`` with that
  background colour and its relevance in the ``title`` tooltip (and, unrounded, in ``data-relevance``); text is
  HTML-escaped.

  With ``merge_subwords=True`` subword pieces are joined into words and their relevance summed. The convention is
  detected from the tokens: if any token starts with ``"Ġ"`` (GPT-2 / RoBERTa BPE) or ``"▁"`` (SentencePiece),
  those mark the start of a word and every other token continues the previous one; otherwise WordPiece is assumed
  (``"##"`` continues a word). Special tokens (``[CLS]``, ``<s>``, ``<|endoftext|>``, ...) always stand alone.

  Args:
    tokens: the token strings, e.g. a tokenizer's ``encoding.tokens``.
    relevance: ``[T]`` per-token relevance, or ``[T, D]`` relevance of the token embeddings (summed over ``D``,
      see :func:`token_relevance`). NumPy or JAX.
    cmap: a colour map name or callable, see :func:`colormap`.
    merge_subwords: join subword pieces into words (relevance summed).
    vmax: the magnitude that saturates the colour map; pass the same value to several heatmaps to compare them
      on one scale. Default: the largest ``|R|`` shown.
    level: gain applied after scaling, as in :func:`heatmap`.
    label: a caption shown before the tokens.

  Returns:
    A :class:`TextHeatmap`: ``str()`` is the HTML fragment, ``.save(path)`` writes a page, ``.render()`` an image.

  Example:
    >>> from jaxlrp.image import text_heatmap
    >>> hm = text_heatmap(["[CLS]", "play", "##ing", "<b>"], [0.0, 1.0, 0.5, -3.0], merge_subwords=True)
    >>> hm.tokens, hm.relevance.tolist()
    (('[CLS]', 'playing', '<b>'), [0.0, 1.5, -3.0])
    >>> hm.colors.tolist()                   # zero: white; +1.5 (half of max |R|): light red; -3: blue
    [[1.0, 1.0, 1.0], [1.0, 0.5, 0.5], [0.0, 0.0, 1.0]]
    >>> span = str(hm).splitlines()[2]       # one <span> per token
    >>> "background-color:#ff8080" in span, 'title="+1.5 (play +1, ##ing +0.5)"' in span
    (True, True)
    >>> str(hm).count("&lt;b&gt;"), str(hm).count("<b>")      # text is escaped
    (1, 0)
  """
  tokens = [str(t) for t in tokens]
  values = _as_float(relevance)
  if values.ndim == 2:
    values = values.sum(axis=-1)
  if values.shape != (len(tokens),):
    raise ValueError(
      f"text_heatmap needs one relevance per token ([T] or [T, D]); got {len(tokens)} tokens and relevance of "
      f"shape {np.shape(relevance)}. For a batch, make one heatmap per sequence."
    )
  if not np.isfinite(values).all():
    raise ValueError(f"relevance has non-finite values at tokens {np.flatnonzero(~np.isfinite(values)).tolist()}.")
  pieces, piece_values = tokens, values
  groups = [[i] for i in range(len(tokens))]
  if merge_subwords:
    tokens, values, groups = _merge_subwords(tokens, values)
  scale = float(np.abs(values).max(initial=0.0)) if vmax is None else float(vmax)
  if not scale >= 0 or not np.isfinite(scale):
    raise ValueError(f"vmax must be a finite non-negative number, got {vmax}.")
  scaled = values / scale if scale > 0 else np.zeros_like(values)
  colors = colormap(0.5 * (1.0 + np.clip(level * scaled, -1.0, 1.0)), cmap).reshape(-1, 3)

  spans = []
  for token, value, colour, group in zip(tokens, values, colors, groups):
    tip = f"{value:+.4g}"
    if len(group) > 1:  # a merged word: show what its pieces contributed
      tip += " (" + ", ".join(f"{pieces[i]} {piece_values[i]:+.4g}" for i in group) + ")"
    style = (f"background-color:{_hex(colour)};color:{_hex(_text_colour(colour))};"
             "padding:0.1em 0.25em;border-radius:0.25em;white-space:pre-wrap")
    spans.append(f'<span style="{style}" title="{_html.escape(tip)}" data-relevance="{float(value)!r}">'
                 f"{_html.escape(token)}</span>")
  caption = f'<b style="margin-right:0.5em">{_html.escape(label)}</b>\n' if label else ""
  fragment = ('<div class="jaxlrp-text-heatmap" style="font-family:sans-serif;line-height:2.2">\n'
              + caption + "\n".join(spans) + "\n</div>")
  return TextHeatmap(tuple(tokens), values.astype(np.float32), colors, fragment, label)


def _heatmap_list(heatmaps) -> list[TextHeatmap]:
  heatmaps = [heatmaps] if isinstance(heatmaps, TextHeatmap) else list(heatmaps)
  if not heatmaps or not all(isinstance(h, TextHeatmap) for h in heatmaps):
    raise ValueError("Expected one TextHeatmap or a non-empty sequence of them (from text_heatmap).")
  return heatmaps


def save_html(heatmaps, path: str | os.PathLike, *, title: str = "jaxlrp relevance") -> Path:
  """Writes one or more text heatmaps, one block each, to a standalone UTF-8 HTML page.

  Args:
    heatmaps: a :class:`TextHeatmap` or a sequence of them.
    path: the file to write; missing parent directories are created.
    title: the page title.

  Returns:
    The path written, as a :class:`pathlib.Path`.

  Example:
    >>> import os, tempfile
    >>> from jaxlrp.image import save_html, text_heatmap
    >>> a = text_heatmap(["good", "movie"], [2.0, 0.5], label="A")
    >>> b = text_heatmap(["bad", "movie"], [-2.0, 0.1], label="B")
    >>> path = save_html([a, b], os.path.join(tempfile.mkdtemp(), "text.html"))
    >>> page = path.read_text(encoding="utf-8")
    >>> page.startswith("<!DOCTYPE html>"), page.count("jaxlrp-text-heatmap")
    (True, 2)
  """
  body = "\n".join(h.html for h in _heatmap_list(heatmaps))
  page = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{_html.escape(title)}</title>\n'
          f'</head>\n<body style="margin:1.5em;max-width:60em">\n{body}\n</body>\n</html>\n')
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(page, encoding="utf-8")
  return path


def _fonts(size: int):
  """Regular and bold fonts: matplotlib's bundled DejaVu Sans if matplotlib is there, else Pillow's default."""
  from PIL import ImageFont

  try:
    from matplotlib import font_manager

    def find(weight):
      props = font_manager.FontProperties(family="DejaVu Sans", weight=weight)
      return ImageFont.truetype(font_manager.findfont(props, fallback_to_default=True), size)

    return find("normal"), find("bold")
  except (ImportError, OSError):  # pragma: no cover - depends on the environment
    font = ImageFont.load_default(size=size)
    return font, font


def render_text(heatmaps, *, width: int = 900, fontsize: int = 16, margin: int = 8) -> np.ndarray:
  """Draws text heatmaps as an RGB image (one block per heatmap, tokens as coloured boxes, wrapped at ``width``).

  Needs Pillow (``pip install "jaxlrp[plots]"``); the font is matplotlib's DejaVu Sans when matplotlib is
  installed. Combine with :func:`save_png`, or place next to pixel heatmaps with :func:`grid`.

  Args:
    heatmaps: a :class:`TextHeatmap` or a sequence of them; a heatmap's ``label`` is drawn in bold before it.
    width: the largest image width in pixels; the image is cropped to the widest line.
    fontsize: font size in pixels.
    margin: white border in pixels.

  Returns:
    float32 RGB in ``[0, 1]``, shape ``(H, W, 3)`` with ``W <= width``; each token's box is filled with exactly
    its colour in ``TextHeatmap.colors`` (rounded to 8 bits).

  Example:
    >>> from jaxlrp.image import render_text, text_heatmap
    >>> img = render_text(text_heatmap(["good", "movie"], [1.0, -1.0]))
    >>> img.ndim, img.shape[-1], bool((img == [1.0, 0.0, 0.0]).all(-1).any())   # a pure red box
    (3, 3, True)
  """
  try:
    from PIL import Image, ImageDraw
  except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("jaxlrp.image.render_text needs Pillow: pip install \"jaxlrp[plots]\"") from err
  heatmaps = _heatmap_list(heatmaps)
  regular, bold = _fonts(fontsize)
  pad_x, pad_y, gap = max(2, fontsize // 4), max(2, fontsize // 6), max(3, fontsize // 3)
  ascent, descent = regular.getmetrics()
  box_h = ascent + descent + 2 * pad_y
  line_h = box_h + gap

  # Layout first (pixel positions of every box), then draw on a canvas of the needed size.
  items, y, right = [], margin, margin
  for h in heatmaps:
    x = margin
    if h.label:
      items.append(("label", h.label, None, x, y))
      x += int(bold.getlength(h.label)) + 2 * gap
    indent = x
    for token, colour in zip(h.tokens, h.colors):
      w = int(np.ceil(regular.getlength(token))) + 2 * pad_x
      if x + w > width - margin and x > indent:
        x, y = indent, y + line_h
      items.append(("token", token, colour, x, y))
      right = max(right, x + w)
      x += w + gap
    y += line_h + gap
  canvas = Image.new("RGB", (min(width, right + margin), y - gap + margin - line_h + box_h), "white")
  draw = ImageDraw.Draw(canvas)
  for kind, text, colour, x, y in items:
    if kind == "label":
      draw.text((x, y + pad_y), text, fill="black", font=bold)
      continue
    w = int(np.ceil(regular.getlength(text))) + 2 * pad_x
    fill = tuple(int(round(float(c) * 255)) for c in colour)
    ink = tuple(int(c * 255) for c in _text_colour(colour))
    draw.rounded_rectangle((x, y, x + w - 1, y + box_h - 1), radius=pad_y + 1, fill=fill)
    draw.text((x + pad_x, y + pad_y), text, fill=ink, font=regular)
  return np.asarray(canvas, dtype=np.float32) / 255.0
