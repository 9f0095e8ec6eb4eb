"""Membership, placement and the wiring: registries, the coordinator, re-planning, the edge and the worker."""
