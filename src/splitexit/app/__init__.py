"""One use case per command (train, calibrate, eval, profile, plan, up, node, run, demo), for the thin CLI."""
