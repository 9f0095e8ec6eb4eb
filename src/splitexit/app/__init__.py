"""One use case per command (cuts, train, calibrate, eval, profile, plan, node, up, run, etcd, demo).

Each returns results and renders nothing: `report/` renders, the CLI prints.
"""
