"""Serving an early-exit net across a chain of nodes: wire, codecs, links, stages, nodes, the entry."""
