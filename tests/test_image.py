"""Tests for jaxlrp.image: colour maps centred at zero, scaling, tiling and PNG output."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlrp import image

CENTRE = {"bwr": [1.0, 1.0, 1.0], "coldnhot": [0.0, 0.0, 0.0]}


@pytest.mark.parametrize("cmap", ["bwr", "coldnhot"])
def test_zero_relevance_is_centre_colour(cmap):
    # All-zero maps (no division by zero) and zeros inside a non-zero map both render as the centre colour.
    blank = image.heatmap(np.zeros((2, 5, 6, 3)), cmap=cmap)
    np.testing.assert_array_equal(blank, np.broadcast_to(CENTRE[cmap], (2, 5, 6, 3)))
    r = np.zeros((4, 4))
    r[0, 0], r[3, 3] = 3.0, -1.0
    out = image.heatmap(r, cmap=cmap)
    assert out.shape == (4, 4, 3)
    np.testing.assert_array_equal(out[1, 2], CENTRE[cmap])


def test_sign_maps_to_its_side():
    r = np.array([[1.0, -1.0, 0.25, -0.25]])
    out = image.heatmap(r, cmap="bwr")
    np.testing.assert_allclose(out[0, 0], [1, 0, 0])  # positive: red end
    np.testing.assert_allclose(out[0, 1], [0, 0, 1])  # negative: blue end
    red, green, blue = out[0, 2]
    assert red == 1.0 and blue < 1.0 and green == blue  # weak positive: light red
    red, green, blue = out[0, 3]
    assert blue == 1.0 and red < 1.0 and green == red  # weak negative: light blue

    hot = image.heatmap(r, cmap="coldnhot")
    np.testing.assert_allclose(hot[0, 0], [1, 1, 1])  # most positive is white (hot end)
    np.testing.assert_allclose(hot[0, 1], [0, 1, 1])  # most negative is cyan (cold end)
    assert hot[0, 2, 0] > 0 and hot[0, 2, 1] == hot[0, 2, 2] == 0  # weak positive: dark red
    assert hot[0, 3, 2] > 0 and hot[0, 3, 0] == hot[0, 3, 1] == 0  # weak negative: dark blue


def test_symmetric_scaling_is_per_image_and_by_max_abs():
    r = np.zeros((2, 1, 3, 1))
    r[0, 0] = [[4.0], [-2.0], [0.0]]
    r[1, 0] = [[0.01], [-0.02], [0.0]]  # a tiny map renders as strongly as a large one
    out = image.heatmap(r)
    # image 0: max |R| = 4 -> +4 is pure red, -2 is half-way to blue; image 1: max |R| = 0.02 -> -0.02 pure blue.
    np.testing.assert_allclose(out[0, 0, 0], [1, 0, 0])
    np.testing.assert_allclose(out[0, 0, 1], [0.5, 0.5, 1.0])
    np.testing.assert_allclose(out[1, 0, 1], [0, 0, 1])
    np.testing.assert_allclose(out[1, 0, 0], [1.0, 0.5, 0.5], atol=1e-6)
    # Symmetric: negating relevance mirrors the colours (bwr is symmetric under R <-> B).
    np.testing.assert_allclose(image.heatmap(-r), image.heatmap(r)[..., ::-1], atol=1e-6)
    # Scale invariance.
    np.testing.assert_allclose(image.heatmap(1e3 * r), out, atol=1e-6)


def test_asymmetric_is_min_max():
    r = np.array([[1.0, 2.0, 3.0]])
    out = image.heatmap(r, symmetric=False)
    np.testing.assert_allclose(out[0, 0], [0, 0, 1])
    np.testing.assert_allclose(out[0, 1], [1, 1, 1])
    np.testing.assert_allclose(out[0, 2], [1, 0, 0])


def test_channel_reduction_and_jax_input():
    r = np.zeros((3, 3, 2), np.float32)
    r[1, 1] = [1.0, -1.0]  # cancels under "sum" and "mean"
    r[0, 0] = [2.0, 0.0]
    for reduce in ("sum", "mean"):
        out = image.heatmap(jnp.asarray(r), reduce_channels=reduce)
        np.testing.assert_array_equal(out[1, 1], [1, 1, 1])
        np.testing.assert_array_equal(out[0, 0], [1, 0, 0])
    out = image.heatmap(jnp.asarray(r, dtype=jnp.bfloat16))
    assert out.dtype == np.float32 and out.shape == (3, 3, 3)
    with pytest.raises(ValueError, match="reduce_channels"):
        image.heatmap(r, reduce_channels="max")
    with pytest.raises(ValueError, match="HW, HWC or NHWC"):
        image.heatmap(np.zeros(4))


def test_level_saturates():
    r = np.array([[1.0, 0.25]])
    np.testing.assert_allclose(image.heatmap(r, level=4.0)[0, 1], [1, 0, 0])


def test_colormap_endpoints_and_callable():
    np.testing.assert_allclose(image.colormap([0.0, 1.0], "coldnhot"), [[0, 1, 1], [1, 1, 1]])
    np.testing.assert_allclose(image.colormap([-5.0, 5.0], "bwr"), [[0, 0, 1], [1, 0, 0]])  # clipped
    grey = image.colormap(np.array([0.2]), lambda v: np.stack([v, v, v], -1))
    np.testing.assert_allclose(grey, [[0.2, 0.2, 0.2]])
    with pytest.raises(ValueError, match="Unknown colour map"):
        image.colormap(0.5, "viridis")


def test_overlay():
    img = np.zeros((2, 4, 4, 1))
    img[:, 0, 0] = 255.0  # any range: min-max scaled per image
    rel = np.zeros((2, 4, 4, 1))
    out = image.overlay(img, rel, alpha=0.25)
    assert out.shape == (2, 4, 4, 3)
    np.testing.assert_allclose(out[0, 0, 0], [1.0, 1.0, 1.0])  # white pixel + white centre colour
    np.testing.assert_allclose(out[0, 1, 1], [0.25, 0.25, 0.25])  # black pixel + 25% white
    plain = image.overlay(img[0, ..., 0], rel[0, ..., 0], alpha=0.0)  # HW inputs, heatmap weight 0
    np.testing.assert_allclose(plain, np.broadcast_to(img[0] / 255.0, (4, 4, 3)))
    with pytest.raises(ValueError, match="different shapes"):
        image.overlay(img, rel[:, :3])


def test_grid_shape_and_placement():
    tiles = [np.full((3, 5), float(i) / 10) for i in range(5)]
    out = image.grid(tiles, ncols=2, pad=1, pad_value=1.0)
    assert out.shape == (3 * 3 + 2, 2 * 5 + 1, 1)
    np.testing.assert_array_equal(out[4:7, 6:11, 0], np.full((3, 5), 0.3, np.float32))  # tile 3: row 1, col 1
    np.testing.assert_array_equal(out[:, 5], 1.0)  # padding column
    np.testing.assert_array_equal(out[8:, 6:], 1.0)  # missing sixth tile
    # NHWC array input, upscaling, and grey tiles promoted to RGB next to a heatmap.
    heat = image.heatmap(np.ones((3, 5)))
    mixed = image.grid([tiles[0], heat], ncols=2, pad=0, scale=4)
    assert mixed.shape == (12, 40, 3)
    np.testing.assert_array_equal(mixed[:, 20:], np.repeat(np.repeat(heat, 4, 0), 4, 1))
    assert image.grid(np.zeros((6, 2, 2, 3)), ncols=3, pad=0).shape == (4, 6, 3)
    with pytest.raises(ValueError, match="one spatial shape"):
        image.grid([np.zeros((2, 2)), np.zeros((3, 3))], ncols=2)


def test_png_round_trip(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    r = np.linspace(-1.0, 1.0, 24).reshape(4, 6)
    rgb = image.heatmap(r, cmap="coldnhot")
    path = image.save_png(rgb, tmp_path / "sub" / "heat.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (6, 4)
        back = np.asarray(im)
    np.testing.assert_array_equal(back, np.round(rgb * 255).astype(np.uint8))
    grey = (np.arange(12, dtype=np.uint8).reshape(3, 4, 1) * 20)
    with Image.open(image.save_png(grey, tmp_path / "grey.png")) as im:
        assert im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), grey[..., 0])
    with pytest.raises(ValueError, match="uint8"):
        image.save_png(np.zeros((2, 2), np.int32), tmp_path / "bad.png")



def test_show_displays_the_scaled_pixels_as_png(tmp_path):
  import io

  from PIL import Image

  rgb = image.heatmap(np.array([[1.0, -1.0], [0.0, 0.5]]))
  picture = image.show(rgb, scale=3)
  decoded = np.asarray(Image.open(io.BytesIO(picture._repr_png_())))
  expected = np.round(np.repeat(np.repeat(rgb, 3, axis=0), 3, axis=1) * 255).astype(np.uint8)
  np.testing.assert_array_equal(decoded, expected)
  assert decoded[0, 0].tolist() == [255, 0, 0] and decoded[0, 5].tolist() == [0, 0, 255]  # red +, blue -
  np.testing.assert_array_equal(np.asarray(Image.open(picture.save(tmp_path / "p.png"))), expected)
  with pytest.raises(ValueError, match="scale"):
    image.show(rgb, scale=0)
  with pytest.raises(ValueError, match="channels"):
    image.show(np.zeros((2, 2, 2)))
