"""Write grafana/dashboards/*.json from panels.py (grafana-foundation-sdk builders).

    python -m grafana.generate          # rewrite the committed JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common, dashboard, prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import StackingMode
from grafana_foundation_sdk.models.dashboard import DataSourceRef

from grafana.panels import DASHBOARDS, PanelSpec

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="prometheus")
WIDTH, HEIGHT = 12, 8


def _panel(spec: PanelSpec) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(spec.title)
        .description(spec.description)
        .unit(spec.unit)
        .datasource(DATASOURCE)
        .span(WIDTH)
        .height(HEIGHT)
    )
    if spec.stacked:
        panel = panel.stacking(common.StackingConfig().mode(StackingMode.NORMAL))
    for i, query in enumerate(spec.queries):
        panel = panel.with_target(
            prometheus.Dataquery().expr(query.expr).legend_format(query.legend)
            .ref_id(chr(ord("A") + i)).datasource(DATASOURCE)
        )
    return panel


def build(uid: str) -> dict[str, object]:
    title, panels = DASHBOARDS[uid]
    board = (
        dashboard.Dashboard(title).uid(uid).tags(["memgate"]).refresh("10s")
        .time("now-30m", "now").timezone("browser")
    )
    for spec in panels:
        board = board.with_panel(_panel(spec))
    data: dict[str, object] = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    return data


def render(uid: str) -> str:
    return json.dumps(build(uid), indent=2, sort_keys=True) + "\n"


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for uid in DASHBOARDS:
        (OUT / f"{uid}.json").write_text(render(uid))
        print(f"wrote {OUT / f'{uid}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
