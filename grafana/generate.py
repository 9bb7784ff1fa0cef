"""Write grafana/dashboards/*.json from panels.py (grafana-foundation-sdk builders).

    python -m grafana.generate          # rewrite the committed JSON

The JSON imports into any Grafana: the datasource is the variable `datasource` (every panel
and query uses `${datasource}`), whose default is the `__inputs` entry DS_PROMETHEUS that
Grafana's import asks for; provisioned from a file (compose), the variable picks the default
Prometheus datasource. Variables job, instance, tenant and model filter every query.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common, dashboard, prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import StackingMode
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableOption, VariableRefresh

from grafana.panels import DASHBOARDS, VARIABLES, PanelSpec

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
INPUT = "DS_PROMETHEUS"  # what Grafana's import asks for and substitutes
WIDTH, HEIGHT = 12, 8
# The classic JSON model's schema version of current Grafana (12.x writes 41); nothing in
# these dashboards needs a migration past 36 (the SDK's own default).
SCHEMA_VERSION = 41
INPUTS = [{"name": INPUT, "label": "Prometheus", "description": "The Prometheus that scrapes "
           "the gateways", "type": "datasource", "pluginId": "prometheus",
           "pluginName": "Prometheus"}]
REQUIRES = [{"type": "grafana", "id": "grafana", "name": "Grafana", "version": "11.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""}]


def _variables() -> list[dashboard.DatasourceVariable | dashboard.QueryVariable]:
    out: list[dashboard.DatasourceVariable | dashboard.QueryVariable] = [
        dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")
        .current(VariableOption(selected=True, text="Prometheus", value=f"${{{INPUT}}}"))]
    for v in VARIABLES:
        selector = f"{{{v.depends}}}" if v.depends else ""
        out.append(
            dashboard.QueryVariable(v.name).label(v.name)
            .query(f"label_values({v.metric}{selector}, {v.label})")
            .datasource(DATASOURCE).multi(True).include_all(True).all_value(".*")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(1))
    return out


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
    for variable in _variables():
        board = board.with_variable(variable)
    row = ""
    for spec in panels:
        if spec.row and spec.row != row:  # a row opens before its first panel (expanded)
            row = spec.row
            board = board.with_row(dashboard.Row(row))
        board = board.with_panel(_panel(spec))
    data: dict[str, object] = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    data.pop("style", None)  # gone from the current model
    data["schemaVersion"] = SCHEMA_VERSION
    return {"__inputs": INPUTS, "__requires": REQUIRES, **data}


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
