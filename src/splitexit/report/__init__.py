"""Presenting results: console tables now; metrics and HTML reports as the runtime grows."""
