"""Summaries of hand-made result rows, Markdown/CSV output, Pareto fronts and PNG plots."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tokenprune import ConfigError
from tokenprune.experiments import (
    NothingToPlot,
    ResultsStore,
    budget_label,
    category_table,
    pareto_front,
    plot_accuracy_vs_budget,
    plot_pareto,
    plot_tokens_per_partition,
    strategy_labels,
    summarize,
    to_csv,
    to_markdown,
    write_report,
)


def _config(allocator: dict[str, Any], selector: dict[str, Any], budget: float) -> dict[str, Any]:
    return {"adapter": None, "allocator": allocator, "selector": selector, "budget": budget}


HIRED_05 = {"name": "hired", "alpha": 0.5, "rounding": "exact"}
HIRED_03 = {"name": "hired", "alpha": 0.3, "rounding": "exact"}
CLS = {"name": "cls_final", "final_layer": -2}
CONFIGS = {
    "gA": _config(HIRED_05, CLS, 0.2),
    "gB": _config(HIRED_05, CLS, 0.4),
    "gC": _config(HIRED_03, CLS, 0.2),
    "gD": _config({"name": "equal"}, {"name": "spatial"}, 0.2),
}


def _row(grid_point: str, sample_id: str, **fields: Any) -> dict[str, Any]:
    return {"grid_point": grid_point, "sample_id": sample_id, "model": "m", "config": CONFIGS[grid_point], **fields}


def _rows() -> list[dict[str, Any]]:
    full = {"full_visual_tokens": 500}
    return [
        _row("gA", "s1", category="color", metric="exact_match", scores={"exact_match": 1.0, "anls": 1.0},
             visual_tokens=100, tokens_per_partition=[40, 60], partitions=["thumbnail", "tile 1"],
             prefill_s=0.2, decode_tokens_per_s=20.0, peak_memory_bytes=1000, prefill_flops=1e12, **full),
        _row("gA", "s2", category="count", metric="anls", scores={"exact_match": 0.0, "anls": 0.5},
             visual_tokens=120, tokens_per_partition=[40, 40, 40], partitions=["thumbnail", "tile 1", "tile 2"],
             prefill_s=0.4, decode_tokens_per_s=30.0, peak_memory_bytes=3000, prefill_flops=None, **full),
        _row("gA", "s3", category="color", metric="exact_match", scores={}, error="CUDA out of memory"),
        _row("gA", "s1", category="color", metric="exact_match", scores={"exact_match": 0.0}),  # duplicate: ignored
        _row("gB", "s1", category="color", metric="exact_match", scores={"exact_match": 1.0}, visual_tokens=200,
             prefill_s=0.5, **full),
        _row("gC", "s1", category="color", metric="exact_match", scores={"exact_match": 0.0}, visual_tokens=100,
             prefill_s=0.25, **full),
        _row("gD", "s1", category="color", metric="exact_match", scores={"exact_match": 1.0}, visual_tokens=100,
             prefill_s=0.1, tokens_per_partition=[50, 50], partitions=["thumbnail", "tile 1"], **full),
    ]  # fmt: skip


def test_summarize_hand_made_rows() -> None:
    summaries = {s.grid_point: s for s in summarize(_rows())}
    a = summaries["gA"]
    assert a.samples == 3 and a.errors == 1  # s1, s2, s3; the repeated s1 is ignored
    assert a.label == "hired(alpha=0.5)+cls_final" and a.budget == 0.2 and a.model == "m"
    assert a.score == pytest.approx(0.75)  # own metrics: s1 exact_match 1.0, s2 anls 0.5; s3 has none
    assert dict(a.scores) == pytest.approx({"exact_match": 0.5, "anls": 0.75})
    assert list(a.scores) == ["exact_match", "anls"]
    assert dict(a.category_scores["color"]) == pytest.approx({"score": 1.0, "exact_match": 1.0, "anls": 1.0})
    assert dict(a.category_scores["count"]) == pytest.approx({"score": 0.5, "exact_match": 0.0, "anls": 0.5})
    assert a.category_counts == {"color": 2, "count": 1}
    assert a.visual_tokens == pytest.approx(110) and a.full_visual_tokens == pytest.approx(500)
    assert a.keep_ratio == pytest.approx(220 / 1000)
    assert a.tokens_per_partition == pytest.approx((40, 50, 40))  # position 1: (60 + 40) / 2
    assert a.partitions == ("thumbnail", "tile 1", "tile 2")
    assert a.prefill_s == pytest.approx(0.3) and a.decode_tokens_per_s == pytest.approx(25)
    assert a.peak_memory_bytes == 3000 and a.prefill_flops == pytest.approx(1e12)
    b = summaries["gB"]
    assert b.decode_tokens_per_s is None and b.peak_memory_bytes is None and b.tokens_per_partition is None
    assert summaries["gC"].label == "hired(alpha=0.3)+cls_final" and summaries["gD"].label == "equal+spatial"
    # Sorted by model, label, budget.
    assert [s.grid_point for s in summarize(_rows())] == ["gD", "gC", "gA", "gB"]


def test_summarize_reads_a_results_file(tmp_path: Path) -> None:
    with ResultsStore(tmp_path / "r.jsonl") as store:
        for row in _rows():
            if not store.is_done(row["grid_point"], row["sample_id"]):
                store.append(row)
    assert [s.samples for s in summarize(tmp_path / "r.jsonl")] == [1, 1, 3, 1]


def test_strategy_labels() -> None:
    configs = [CONFIGS["gA"], CONFIGS["gC"], CONFIGS["gD"], {**CONFIGS["gD"], "adapter": {"name": "llava_next"}}]
    assert strategy_labels(configs) == [
        "none+hired(alpha=0.5)+cls_final",
        "none+hired(alpha=0.3)+cls_final",
        "none+equal+spatial",
        "llava_next+equal+spatial",
    ]
    assert strategy_labels([CONFIGS["gD"], CONFIGS["gD"]], ["m1", "m2"]) == ["equal+spatial [m1]", "equal+spatial [m2]"]
    assert strategy_labels([None, CONFIGS["gD"]]) == ["?", "equal+spatial"]
    assert [s.label for s in summarize([{"grid_point": "g9", "sample_id": "a"}])] == ["g9"]


def test_budget_label() -> None:
    assert budget_label(0.2) == "20%" and budget_label(0.125) == "12.5%"
    assert budget_label(576) == "576 tokens" and budget_label(None) == "–"


def test_markdown_table() -> None:
    text = to_markdown(summarize(_rows()))
    lines = text.splitlines()
    assert lines[0] == (
        "| strategy | budget | n | score % | exact_match % | anls % | tokens kept | kept % | prefill ms"
        " | decode tok/s | peak MiB | prefill TFLOPs |"
    )
    assert lines[1] == "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    assert (
        "| hired(alpha=0.5)+cls_final | 20% | 3 (1 failed) | 75.0 | 50.0 | 75.0 | 110.0 | 22.0 | 300.0 | 25.0 | 0 | 1.00 |"
        in lines
    )
    assert "| equal+spatial | 20% | 1 | 100.0 | 100.0 | – | 100.0 | 20.0 | 100.0 | – | – | – |" in lines
    categories = category_table(summarize(_rows()))
    assert "| hired(alpha=0.5)+cls_final | 20% | 100.0 | 50.0 |" in categories
    assert categories.startswith("score % per category") and "color (n=2)" in categories


def test_markdown_drops_empty_columns() -> None:
    rows = [_row("gD", "s1", scores={"exact_match": 1.0})]
    assert to_markdown(summarize(rows)).splitlines()[0] == "| strategy | budget | n | exact_match % |"


def test_csv(tmp_path: Path) -> None:
    text = to_csv(summarize(_rows()), tmp_path / "s.csv")
    assert (tmp_path / "s.csv").read_text(encoding="utf-8") == text
    records = {r["grid_point"]: r for r in csv.DictReader(io.StringIO(text))}
    a = records["gA"]
    assert float(a["exact_match"]) == 0.5 and float(a["anls"]) == 0.75 and float(a["score"]) == 0.75
    assert a["tokens_per_partition"] == "40 50 40" and a["peak_memory_bytes"] == "3000"
    assert float(a["color/exact_match"]) == 1.0 and float(a["count/anls"]) == 0.5
    assert json.loads(a["config"]) == CONFIGS["gA"]
    assert records["gB"]["decode_tokens_per_s"] == "" and records["gB"]["anls"] == ""


def test_pareto_front() -> None:
    # Sorted by cost: (1, .5) #1, (1, .5) #4 duplicate, (2, .7) #2, (2, .6) #3 dominated, (3, .9) #0.
    assert pareto_front([3, 1, 2, 2, 1], [0.9, 0.5, 0.7, 0.6, 0.5]) == [1, 2, 0]
    assert pareto_front([1, 2, 3], [0.9, 0.8, 0.7]) == [0]  # cheapest is also best
    assert pareto_front([], []) == []
    with pytest.raises(ConfigError):
        pareto_front([1], [])


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    with Image.open(path) as image:
        assert image.width > 300 and image.height > 200
        assert len(np.unique(np.asarray(image.convert("L")))) > 10  # something drawn, not a blank canvas


def test_plots_write_pngs(tmp_path: Path) -> None:
    summaries = summarize(_rows())
    _assert_png(plot_accuracy_vs_budget(summaries, tmp_path / "acc.png"))
    _assert_png(plot_accuracy_vs_budget(summaries, tmp_path / "acc_tokens.png", metric="exact_match", x="tokens"))
    _assert_png(plot_tokens_per_partition(summaries, tmp_path / "parts.png"))
    _assert_png(plot_pareto(summaries, tmp_path / "pareto.png"))
    _assert_png(plot_pareto(summaries, tmp_path / "pareto_tokens.png", cost="visual_tokens"))
    bare = summarize([_row("gD", "s1", scores={"exact_match": 1.0})])
    with pytest.raises(NothingToPlot, match="prefill_s"):
        plot_pareto(bare, tmp_path / "none.png")
    with pytest.raises(NothingToPlot, match="tokens_per_partition"):
        plot_tokens_per_partition(bare, tmp_path / "none.png")
    with pytest.raises(ConfigError, match="x must be"):
        plot_accuracy_vs_budget(summaries, tmp_path / "x.png", x="time")
    assert not (tmp_path / "none.png").exists()


def test_write_report(tmp_path: Path) -> None:
    written = write_report(_rows(), tmp_path / "report")
    assert set(written) == {"markdown", "csv", "json", "accuracy_vs_budget", "tokens_per_partition", "pareto"}
    markdown = written["markdown"].read_text(encoding="utf-8")
    assert markdown.startswith("# Results") and "per category" in markdown
    for name in ("accuracy_vs_budget", "tokens_per_partition", "pareto"):
        _assert_png(written[name])
    partial = write_report([_row("gD", "s1", scores={"exact_match": 1.0})], tmp_path / "partial")
    assert set(partial) == {"markdown", "csv", "json", "accuracy_vs_budget"}  # plots without data are skipped
    with pytest.raises(ConfigError, match="no result rows"):
        write_report([], tmp_path / "empty")


# ---------------------------------------------------------------- output a reader can trust
def _svg_texts(path: Path) -> list[tuple[float, float, str]]:
    import re

    found = re.findall(r'<text [^>]*x="([-\d.]+)" y="([-\d.]+)"[^>]*>([^<]*)</text>', path.read_text(encoding="utf-8"))
    return [(float(x), float(y), text) for x, y, text in found]


def _any_row(grid_point: str, sample_id: str, **fields: Any) -> dict[str, Any]:
    return {"grid_point": grid_point, "sample_id": sample_id, "model": "m", **fields}


def _timed_rows(times: list[float], grid_point: str = "g") -> list[dict[str, object]]:
    return [
        _row(grid_point, f"s{i}", scores={"exact_match": 1.0}, prefill_s=t, category="color" if i % 2 else "count")
        for i, t in enumerate(times)
    ]


def test_noisy_timings_are_flagged_with_their_spread(tmp_path: Path) -> None:
    steady = _timed_rows([0.016, 0.017, 0.016, 0.018], "gA")
    noisy = _timed_rows([0.016, 0.160, 0.017, 0.016], "gC")
    summaries = {s.grid_point: s for s in summarize(steady + noisy)}
    assert not summaries["gA"].timing_noisy and summaries["gC"].timing_noisy
    assert summaries["gC"].prefill_s_median == pytest.approx(0.0165) and summaries["gC"].prefill_s_cv > 1.0
    assert summaries["gC"].prefill_s_p10 < summaries["gC"].prefill_s_median < summaries["gC"].prefill_s_p90
    text = to_markdown(list(summaries.values()))
    assert "| 52.3 ⚠ |" in text and "⚠ noisy timing" in text and "| 16.8 |" in text
    record = {r["grid_point"]: r for r in csv.DictReader(io.StringIO(to_csv(list(summaries.values()))))}
    assert record["gC"]["timing_noisy"] == "1" and float(record["gC"]["prefill_s_cv"]) > 1.0


def test_the_category_table_is_in_summary_csv_and_json(tmp_path: Path) -> None:
    written = write_report(_rows(), tmp_path, plots=False)
    records = {r["grid_point"]: r for r in json.loads(written["json"].read_text(encoding="utf-8"))}
    assert records["gA"]["categories"]["color"] == {"n": 2, "score": 1.0, "exact_match": 1.0, "anls": 1.0}
    assert records["gA"]["categories"]["count"]["n"] == 1 and records["gA"]["label"] == "hired(alpha=0.5)+cls_final"
    table = {r["grid_point"]: r for r in csv.DictReader(io.StringIO(written["csv"].read_text(encoding="utf-8")))}
    assert table["gA"]["color/n"] == "2" and table["gA"]["count/n"] == "1"


def test_tokens_plot_has_a_panel_per_grid_and_a_colour_per_series(tmp_path: Path) -> None:
    import re

    two_by_two = ["thumbnail", "tile r0c0", "tile r0c1", "tile r1c0", "tile r1c1"]
    one_by_three = ["thumbnail", "tile r0c0", "tile r0c1", "tile r0c2"]
    rows = []
    for g in range(12):
        config = {**CONFIGS["gA"], "allocator": {"name": "hired", "alpha": g / 11}}
        rows.append(_any_row(f"g{g}", "wide", config=config, tokens_per_partition=[g, 1, 1, 1], partitions=one_by_three))
        rows.append(_any_row(f"g{g}", "square", config=config, tokens_per_partition=[g, 2, 2, 2, 2], partitions=two_by_two))
    summaries = summarize(rows)
    assert summaries[0].tokens_per_layout == {tuple(two_by_two): (0.0, 2.0, 2.0, 2.0, 2.0), tuple(one_by_three): (0.0, 1.0, 1.0, 1.0)}
    svg = plot_tokens_per_partition(summaries, tmp_path / "parts.svg")
    texts = [text for _, _, text in _svg_texts(svg)]
    assert "tile r1c1" in texts and "tile r0c2" in texts  # each grid's own tiles
    headings = [text for text in texts if text.endswith("image(s)")]
    assert sorted(h.removeprefix("tokens per partition: ") for h in headings) == ["1x3 grid, 1 image(s)", "2x2 grid, 1 image(s)"]
    fills = set(re.findall(r'clip-path="[^"]*" style="fill: (#[0-9a-f]{6})"', svg.read_text()))
    assert len(fills) == 12  # no colour reused past 10 series


def test_pareto_labels_do_not_overlap_and_a_single_point_has_no_front(tmp_path: Path) -> None:
    rows = [
        _any_row(f"g{k}", "s", config={**CONFIGS["gD"], "budget": budget}, scores={"exact_match": 1.0}, prefill_s=t)
        for k, (budget, t) in enumerate([(0.1, 0.010), (0.2, 0.010), (0.3, 0.0101), (0.4, 0.0102)])
    ]
    svg = plot_pareto(summarize(rows), tmp_path / "p.svg")
    labels = [(x, y, text) for x, y, text in _svg_texts(svg) if text.endswith("%")]
    assert "10%, 20%" in [text for _, _, text in labels]  # coinciding points share one label
    spots = [(round(x), round(y)) for x, y, _ in labels]
    assert len(spots) == len(set(spots)) == 3
    near = sorted(labels, key=lambda label: label[0])[1:]  # 30% and 40%: close together, stacked apart
    assert abs(near[0][1] - near[1][1]) > 5 or abs(near[0][0] - near[1][0]) > 20
    assert "Pareto front" not in [text for _, _, text in _svg_texts(svg)]  # the front is one point: not drawn
    front = [
        _any_row(f"h{k}", "s", config={**CONFIGS["gD"], "budget": b}, scores={"exact_match": q}, prefill_s=t)
        for k, (b, q, t) in enumerate([(0.1, 0.0, 0.01), (0.2, 1.0, 0.02)])
    ]
    assert "Pareto front" in [text for _, _, text in _svg_texts(plot_pareto(summarize(front), tmp_path / "f.svg"))]
