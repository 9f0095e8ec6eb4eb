"""Presenting what `app/` returns: console tables, JSON objects, the run report (HTML, PNG plots), the demo's view."""
