"""Vega-Lite specs of the console's charts (pure: data in, spec out; rendered in the browser by vega-embed).

Suppressed cells (None, shown as "<5" in the tables next to each chart) are left out of the charts rather
than drawn as zero: a bar of height zero would claim a figure the site did not release."""

from __future__ import annotations

from typing import Any

SCHEMA = "https://vega.github.io/schema/vega-lite/v6.json"
WIDTH = 360


def _base(title: str, values: list[dict], description: str) -> dict[str, Any]:
    return {"$schema": SCHEMA, "title": title, "description": description, "width": WIDTH, "height": 180,
            "data": {"values": values}, "config": {"font": "sans-serif", "view": {"stroke": None}}}


def breakdown_bars(name: str, per_site: dict[str, dict[str, int | None]], order: list[str] | None = None) -> dict:
    """Grouped bars of one breakdown (sex, age band, modality, manufacturer): one bar per site per category."""
    values = [{"category": cat, "site": site, "patients": v}
              for site, cells in per_site.items() for cat, v in cells.items() if v is not None]
    spec = _base(name.replace("_", " "), values, f"Patients by {name.replace('_', ' ')} and site (suppressed cells omitted)")
    spec |= {"mark": {"type": "bar", "tooltip": True},
             "encoding": {"x": {"field": "category", "type": "nominal", "title": None, "sort": order or "ascending",
                                "axis": {"labelAngle": -30}},
                          "xOffset": {"field": "site"},
                          "y": {"field": "patients", "type": "quantitative", "title": "patients"},
                          "color": {"field": "site", "type": "nominal", "title": "site"}}}
    return spec


def histogram(name: str, labels: list[str], per_site: dict[str, list[int | None]]) -> dict:
    """Stacked histogram of a numeric field over the sites' released bins (site-fixed edges)."""
    values = [{"bin": lab, "order": i, "site": site, "patients": v}
              for site, hist in per_site.items() for i, (lab, v) in enumerate(zip(labels, hist)) if v is not None]
    spec = _base(name, values, f"Histogram of {name} per site, stacked (suppressed bins omitted)")
    spec |= {"mark": {"type": "bar", "tooltip": True},
             "encoding": {"x": {"field": "bin", "type": "ordinal", "title": name, "sort": labels,
                                "axis": {"labelAngle": -30}},
                          "y": {"field": "patients", "type": "quantitative", "stack": "zero", "title": "patients"},
                          "color": {"field": "site", "type": "nominal"}}}
    return spec


def timeline(points: list[dict], key: str, metric: str, title: str) -> dict:
    """Line per scanner (``key``) of a monitoring metric over time buckets."""
    values = [{"time": p["t"] * 1000, "scanner": str(p.get(key)), "value": p.get(metric), "n": p.get("n")}
              for p in points if p.get(metric) is not None]
    spec = _base(title, values, f"{title} by {key.replace('_', ' ')} over time")
    spec |= {"mark": {"type": "line", "point": True, "tooltip": True},
             "encoding": {"x": {"field": "time", "type": "temporal", "title": "time"},
                          "y": {"field": "value", "type": "quantitative", "title": metric.replace("_", " "),
                                "scale": {"zero": False}},
                          "color": {"field": "scanner", "type": "nominal", "title": key.replace("_", " ")}}}
    return spec


def bars(title: str, rows: list[dict], x: str, y: str, color: str | None = None) -> dict:
    """Bars in the order of ``rows`` (optionally grouped by ``color``)."""
    spec = _base(title, rows, title)
    enc: dict[str, Any] = {"x": {"field": x, "type": "nominal", "title": x.replace("_", " "), "sort": None},
                           "y": {"field": y, "type": "quantitative", "title": y.replace("_", " ")}}
    if color:
        enc["color"] = {"field": color, "type": "nominal"}
        enc["xOffset"] = {"field": color}
    spec |= {"mark": {"type": "bar", "tooltip": True}, "encoding": enc}
    return spec


def lines(title: str, rows: list[dict], x: str, y: str, color: str | None = None, xtype: str = "ordinal") -> dict:
    spec = _base(title, rows, title)
    enc: dict[str, Any] = {"x": {"field": x, "type": xtype, "title": x.replace("_", " ")},
                           "y": {"field": y, "type": "quantitative", "title": y.replace("_", " ")}}
    if color:
        enc["color"] = {"field": color, "type": "nominal"}
    spec |= {"mark": {"type": "line", "point": True, "tooltip": True}, "encoding": enc}
    return spec


__all__ = ["bars", "breakdown_bars", "histogram", "lines", "timeline"]
