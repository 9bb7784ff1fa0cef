"""docs/performance.md's generated tables and docs/figures/*.svg equal what bench/docs_figures.py
makes from bench/results/*.json (no benchmark runs): a figure cannot drift from its
measurement. Fix a failure with `make docs-figures` (= .venv/bin/python -m bench.docs_figures)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from bench import docs_figures as figs

MARKER = re.compile(r"<!-- generated:([a-z0-9-]+):(begin|end) -->")


def _description(svg: bytes) -> object:
    m = re.search(rb"<dc:description>(.*?)</dc:description>", svg, re.S)
    assert m, "chart without its data in <dc:description>"
    text = m.group(1).decode().replace("&quot;", '"').replace("&amp;", "&")
    return json.loads(text.replace("&lt;", "<").replace("&gt;", ">"))


def _matplotlib_of(svg: bytes) -> str:
    m = re.search(rb"Matplotlib v([0-9][^,<]*)", svg)
    return m.group(1).decode() if m else ""


def test_generated_tables_equal_the_committed_page() -> None:
    page = figs.PAGE.read_text()
    assert figs.render_page(page) == page, "stale tables: run make docs-figures"


def test_every_marker_is_a_known_table_and_paired() -> None:
    found = MARKER.findall(figs.PAGE.read_text())
    names = [n for n, side in found if side == "begin"]
    assert sorted(names) == sorted(figs.TABLES)
    assert found == [(n, s) for n in names for s in ("begin", "end")]


@pytest.fixture(scope="module")
def fresh() -> dict[str, bytes]:
    return figs.render_charts()


@pytest.mark.parametrize("name", list(figs.CHARTS))
def test_chart_data_equals_the_results(name: str, fresh: dict[str, bytes]) -> None:
    committed = (figs.FIGURES / name).read_bytes()
    assert _description(committed) == _description(fresh[name]), f"stale {name}"


@pytest.mark.parametrize("name", list(figs.CHARTS))
def test_chart_bytes_equal_a_fresh_render(name: str, fresh: dict[str, bytes]) -> None:
    import matplotlib

    committed = (figs.FIGURES / name).read_bytes()
    if _matplotlib_of(committed) != matplotlib.__version__:
        # another matplotlib draws other paths; the data test above still holds the numbers
        pytest.skip(f"rendered with matplotlib {_matplotlib_of(committed)}, "
                    f"here {matplotlib.__version__}")
    assert committed == fresh[name], f"stale {name}: run make docs-figures"


def test_render_is_deterministic(fresh: dict[str, bytes]) -> None:
    assert figs.render_charts() == fresh


def test_page_embeds_every_chart_and_no_other_file() -> None:
    page = figs.PAGE.read_text()
    linked = set(re.findall(r"!\[[^\]]*\]\(figures/([^)]+)\)", page))
    on_disk = {p.name for p in figs.FIGURES.iterdir()}
    assert linked == set(figs.CHARTS) == on_disk


def test_a_changed_result_changes_the_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(figs.RESULTS, tmp_path, dirs_exist_ok=True)
    serving = json.loads((tmp_path / "serving.json").read_text())
    serving["results"]["tokens_per_s_single"] = 999.0
    (tmp_path / "serving.json").write_text(json.dumps(serving))
    monkeypatch.setattr(figs, "RESULTS", tmp_path)
    page = figs.PAGE.read_text()
    fresh = figs.render_page(page)
    assert fresh != page and "| tokens/s, one request | 999 |" in fresh


def test_missing_markers_fail_loudly() -> None:
    with pytest.raises(SystemExit, match="markers"):
        figs.render_page("# no markers here\n")
