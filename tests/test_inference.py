"""Help texts that state each default once; class-index PNGs; figures with many classes and void."""

import numpy as np
import pytest
from PIL import Image

import figures
from cli import Parser
from dataset import ClassTable, load_mask, palette


def test_parser_shows_a_default_of_0(capsys):
    p = Parser(prog="x")
    p.add_argument("--n", type=int, default=0, help="how many")
    p.add_argument("--what", help="a path, or nothing")
    p.print_help()
    text = " ".join(capsys.readouterr().out.split())
    assert "how many (default: 0)" in text and "(default: None)" not in text


# --- class-index PNGs ----------------------------------------------------------------------


@pytest.mark.parametrize("ignore_index", [3, 300])
def test_labels_png_reads_back_as_class_indices(tmp_path, ignore_index):
    table = ClassTable(names=["a", "b", "c"], colours=[(255, 255, 255), (0, 0, 0), (200, 10, 10)],
                       ignore_index=ignore_index, void_colour=(0, 0, 0))
    labels = np.random.default_rng(0).integers(0, 3, (20, 30))
    labels[:4, :5] = ignore_index
    figures.save_labels(tmp_path / "l.png", labels, palette(table), ignore_index, table.void_colour)
    img = Image.open(tmp_path / "l.png")
    assert img.mode == "P"
    stored = min(ignore_index, 255)
    assert np.array_equal(np.asarray(img), np.where(labels == ignore_index, stored, labels))
    pal = np.array(img.getpalette()).reshape(-1, 3)
    assert pal[:3].tolist() == [[255, 255, 255], [0, 0, 0], [200, 10, 10]]
    if ignore_index == 3:  # the project's own reader gets the same labels back, void included
        assert np.array_equal(load_mask(tmp_path / "l.png", table).numpy(), labels)


# --- figures -------------------------------------------------------------------------------


def test_legend_of_32_classes_stays_below_the_panels(tmp_path, monkeypatch):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    drawn = []
    monkeypatch.setattr(figures, "save", lambda fig, path, dpi=100: drawn.append(fig))
    table = ClassTable(names=[f"class number {i}" for i in range(32)], colours=[None] * 32, ignore_index=32)
    pred = np.arange(48)[None].repeat(32, 0) % 32
    figures.save_figure(tmp_path / "f.png", np.zeros((32, 48, 3), np.uint8), pred, palette(table), table, pred,
                        np.zeros((32, 48)), 1.0)
    fig = drawn[0]
    FigureCanvasAgg(fig).draw()
    legend = fig.legends[0].get_window_extent()
    panels = min(ax.get_tightbbox().y0 for ax in fig.axes)
    assert legend.y1 <= panels and legend.y0 >= 0 and legend.x0 >= 0 and legend.x1 <= fig.bbox.width


def test_void_is_drawn_unlike_a_black_class():
    pal = np.array([[0, 0, 0], [255, 255, 255]], np.uint8)
    labels = np.array([[0] * 8, [9] * 8] * 4)
    rgb = figures.colourize(labels, pal, ignore_index=9)
    void = rgb[labels == 9]
    assert (void != 0).any(1).all() and len({tuple(c) for c in void}) == 2  # grey checkerboard, no black
