"""The web console at /ui (issue 28, docs/ui.md): server-rendered pages (jinja2 templates) enhanced with
htmx, charts as Vega-Lite specs rendered in the browser by vega-embed. Pure helpers only here; the
routes are in ``gateway.handlers.ui``."""
