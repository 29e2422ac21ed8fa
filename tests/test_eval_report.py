"""The accuracy report's plot: one colour per method across all lengths."""

import pytest

from flexprefill_hf.eval import report

pytest.importorskip("matplotlib")


def _average(length, method, fraction, score):
    value = (score, 1.0)
    return dict(task=report.AVERAGE, length=length, method=method, n=8, ruler_score=value,
                strict_log_prob=(-score / 100, 0.1), strict_top1=(score / 100, 0.01),
                computed_fraction=(fraction, 0.0), prefill_s=(0.01, 0.0))


def test_a_method_missing_at_one_length_keeps_every_other_colour(tmp_path, monkeypatch):
    import matplotlib.axes

    seen = []
    real = matplotlib.axes.Axes.errorbar

    def errorbar(self, x, y, *args, **kwargs):
        seen.append((self.get_title(), kwargs["label"], kwargs["color"]))
        return real(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", errorbar)
    rows = [
        _average(2048, "dense", 1.0, 50), _average(2048, "ablation", 0.7, 40), _average(2048, "streaming", 0.7, 30),
        _average(4096, "dense", 1.0, 45), _average(4096, "streaming", 0.5, 20),  # no ablation at 4096
    ]
    kinds = {"dense": "dense", "ablation": "ablation", "streaming": "streaming"}
    path = report.plot_score_vs_fraction(rows, kinds, tmp_path / "plot.png")
    assert path.exists() and path.stat().st_size > 0
    colours = {}
    for _, label, colour in seen:
        colours.setdefault(label, set()).add(colour)
    assert set(colours) == set(kinds)
    assert all(len(c) == 1 for c in colours.values()), colours  # the same colour at every length and panel
    assert len({next(iter(c)) for c in colours.values()}) == len(kinds)  # and distinct between methods
