"""The operator's dashboard without Grafana (which is not packaged here): reads the
provisioned dashboard (deploy/grafana/dashboards/echelon.json), finds the metric selectors
of its queries, runs the same queries against live Prometheus servers and writes the
panels as one HTML page of charts and tables; `--png` photographs it in headless Chromium.

    python -m echelon_tools.dashboard --global-url http://127.0.0.1:9090 \\
        --organization-url http://127.0.0.1:9091 --html dash.html --png dash.png

`python -m echelon_tools.dashboard_shot` runs a deployment and its Prometheus servers and
calls this (docs/operations.md, "Reading the dashboard").
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from echelon_tools.prometheus_live import PrometheusAPI, PrometheusError

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "echelon.json"
#: Grafana's own variables, as the renderer and the checks expand them.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_TOKEN = re.compile(
    r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|\[[^\]]*\]|\{[^}]*\}'
    r"|[A-Za-z_:][A-Za-z0-9_:]*|\d+(?:\.\d+)?(?:e[+-]?\d+)?|\S"
)


@dataclass(frozen=True)
class Query:
    """One query of one panel, and which Prometheus answers it ("global" or "organization")."""

    panel: str
    kind: str  # the panel's type: timeseries, stat, table
    plane: str
    expr: str
    legend: str
    unit: str


def _plane(datasource: object) -> str:
    uid = datasource.get("uid", "") if isinstance(datasource, dict) else str(datasource)
    if "organization" in uid:
        return "organization"
    if "global" in uid:
        return "global"
    raise ValueError(f"datasource {datasource!r}: want ${{global}} or ${{organization}}")


def load_queries(path: Path = DASHBOARD) -> list[Query]:
    """Every query of every panel of the dashboard at `path`.

    Raises:
        ValueError: a panel names a datasource other than the two variables.
    """
    dashboard = json.loads(path.read_text())
    out = []
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            continue
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        for target in panel.get("targets", []):
            out.append(
                Query(
                    panel=panel["title"],
                    kind=panel["type"],
                    plane=_plane(target.get("datasource", panel.get("datasource"))),
                    expr=target["expr"],
                    legend=target.get("legendFormat", ""),
                    unit=unit,
                )
            )
    return out


def expand(expr: str, variables: Mapping[str, str] = GRAFANA_VARIABLES) -> str:
    """`expr` with Grafana's variables replaced, as Prometheus receives it."""
    for name, value in variables.items():
        expr = expr.replace(name, value)
    return expr


def _tokens(expr: str) -> list[str]:
    return [t for t in _TOKEN.findall(expr) if not t.isspace()]


def selectors(expr: str) -> list[str]:
    """The instant-vector selectors (`name{matchers}`) of a PromQL expression, in order:
    each metric name with the label matchers written beside it; function and aggregation
    names, label lists (`by (le)`), keywords, numbers and strings are not selectors."""
    tokens = _tokens(expand(expr))
    out: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else ""
        if token in _LABEL_LISTS and following == "(":
            i = tokens.index(")", i) + 1
            continue
        if re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", token) and token not in _KEYWORDS:
            if following == "(" or following in _LABEL_LISTS:  # a function, an aggregation
                i += 1
                continue
            if following.startswith("{"):
                out.append(token + following)
                i += 2
                continue
            out.append(token)
        i += 1
    return out


def metric_name(selector: str) -> str:
    return selector.split("{", 1)[0]


# -- the page -------------------------------------------------------------------------------
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")


def _legend(template: str, labels: Mapping[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)
    return text or ", ".join(f"{k}={v}" for k, v in labels.items() if k != "__name__")


def _number(value: float, unit: str) -> str:
    if value != value:  # NaN
        return "-"
    if unit == "s":
        return f"{value:.3g} s"
    if unit == "Bps":
        return f"{value:.3g} B/s"
    if unit == "percentunit":
        return f"{100 * value:.3g} %"
    return f"{value:.4g}"


def _chart(series: list[tuple[str, list[tuple[float, float]]]], unit: str) -> str:
    """An inline SVG line chart of `series` (label, [(t, v)])."""
    width, height, pad = 430, 170, 34
    points = [(t, v) for _, values in series for t, v in values if v == v]
    if not points:
        return '<p class="empty">no data</p>'
    t0, t1 = min(p[0] for p in points), max(p[0] for p in points)
    v0, v1 = min(0.0, min(p[1] for p in points)), max(p[1] for p in points)
    t1, v1 = (t1 if t1 > t0 else t0 + 1), (v1 if v1 > v0 else v0 + 1)

    def xy(t: float, v: float) -> str:
        x = pad + (t - t0) / (t1 - t0) * (width - pad - 6)
        y = height - 16 - (v - v0) / (v1 - v0) * (height - 26)
        return f"{x:.1f},{y:.1f}"

    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">']
    parts.append(
        f'<line x1="{pad}" y1="{height - 16}" x2="{width}" y2="{height - 16}" class="ax"/>'
    )
    parts.append(f'<text x="2" y="14" class="tick">{html.escape(_number(v1, unit))}</text>')
    parts.append(
        f'<text x="2" y="{height - 18}" class="tick">{html.escape(_number(v0, unit))}</text>'
    )
    span = (t1 - t0) / 60
    parts.append(f'<text x="{width - 70}" y="{height - 2}" class="tick">{span:.1f} min</text>')
    for n, (_, values) in enumerate(series):
        path = " ".join(xy(t, v) for t, v in values if v == v)
        colour = _COLOURS[n % len(_COLOURS)]
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
    parts.append("</svg>")
    keys = "".join(
        f'<span style="color:{_COLOURS[n % len(_COLOURS)]}">&#9632; {html.escape(label)}</span> '
        for n, (label, _) in enumerate(series)
    )
    return "".join(parts) + f'<div class="keys">{keys}</div>'


def _panels(queries: Sequence[Query]) -> Iterator[tuple[str, list[Query]]]:
    order: dict[str, list[Query]] = {}
    for q in queries:
        order.setdefault(q.panel, []).append(q)
    yield from order.items()


def render(
    queries: Sequence[Query],
    apis: Mapping[str, PrometheusAPI],
    *,
    minutes: float,
    now: float | None = None,
    title: str = "Echelon",
) -> str:
    """The dashboard as one HTML page: each panel's queries over the last `minutes`."""
    end = time.time() if now is None else now
    start = end - 60 * minutes
    step = max(1.0, 60 * minutes / 120)
    cells = []
    for panel, members in _panels(queries):
        kind, unit = members[0].kind, members[0].unit
        body = ""
        if kind in ("stat", "table"):
            rows = []
            for q in members:
                for s in apis[q.plane].query(expand(q.expr)):
                    value = float(s["value"][1])
                    rows.append((_legend(q.legend, s["metric"]), _number(value, unit)))
            body = "".join(
                f"<tr><td>{html.escape(k)}</td><td class='v'>{html.escape(v)}</td></tr>"
                for k, v in rows
            )
            body = f"<table>{body}</table>" if rows else '<p class="empty">no data</p>'
        else:
            series: list[tuple[str, list[tuple[float, float]]]] = []
            for q in members:
                for s in apis[q.plane].query_range(expand(q.expr), start, end, step):
                    values = [(float(t), float(v)) for t, v in s["values"]]
                    series.append((_legend(q.legend, s["metric"]), values))
            body = _chart(series, unit)
        plane = "organization" if members[0].plane == "organization" else "global plane"
        cells.append(
            f'<div class="panel"><h3>{html.escape(panel)} <small>{plane}</small></h3>{body}</div>'
        )
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(end))
    return _PAGE.format(title=html.escape(title), stamp=stamp, cells="\n".join(cells))


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body {{ font-family: sans-serif; background: #111217; color: #d8d9da; margin: 12px; }}
h1 {{ font-size: 20px; margin: 4px 0 10px; }} h3 {{ font-size: 13px; margin: 0 0 6px; }}
small {{ color: #8e8e8e; font-weight: normal; }}
.grid {{ display: grid; grid-template-columns: repeat(4, 1fr); gap: 8px; }}
.panel {{ background: #181b1f; border: 1px solid #2c3235; padding: 8px; min-height: 120px; }}
.ax {{ stroke: #555; }} .tick {{ fill: #8e8e8e; font-size: 10px; }}
.keys {{ font-size: 10px; line-height: 1.4; }} .empty {{ color: #8e8e8e; }}
table {{ font-size: 12px; border-collapse: collapse; width: 100%; }}
td {{ border-bottom: 1px solid #2c3235; padding: 2px 4px; }} .v {{ text-align: right; }}
</style></head><body><h1>{title} <small>rendered from live Prometheus at {stamp}</small></h1>
<div class="grid">
{cells}
</div></body></html>
"""


def screenshot(page: Path, png: Path, *, width: int = 1900, height: int = 2130) -> None:
    """Photographs `page` in headless Chromium.

    Raises:
        RuntimeError: no chromium on PATH, or it wrote no picture.
    """
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        raise RuntimeError("no chromium on PATH: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                binary,
                *("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"),
                *("--disable-background-networking", "--disable-component-update"),
                "--disable-sync",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--screenshot={png.resolve()}",
                page.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    if not png.exists():
        raise RuntimeError(f"chromium wrote no {png}")


def write(
    global_url: str,
    organization_url: str,
    html_path: Path,
    png: Path | None,
    minutes: float,
    dashboard: Path = DASHBOARD,
) -> None:
    apis = {"global": PrometheusAPI(global_url), "organization": PrometheusAPI(organization_url)}
    html_path.write_text(render(load_queries(dashboard), apis, minutes=minutes))
    if png is not None:
        screenshot(html_path, png)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m echelon_tools.dashboard",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--global-url", required=True, help="the global plane's Prometheus")
    parser.add_argument("--organization-url", required=True, help="an organization's Prometheus")
    parser.add_argument("--html", type=Path, required=True, help="write the page here")
    parser.add_argument("--png", type=Path, help="and photograph it here")
    parser.add_argument("--minutes", type=float, default=15.0, help="the charts' time range")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        write(
            args.global_url,
            args.organization_url,
            args.html,
            args.png,
            args.minutes,
            args.dashboard,
        )
    except (PrometheusError, RuntimeError, OSError) as exc:
        print(f"dashboard: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
