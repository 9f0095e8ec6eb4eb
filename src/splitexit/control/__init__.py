"""Membership and placement: the registry and the coordinator."""
