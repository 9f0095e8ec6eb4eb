"""Planning: profile a package (``profile.py``, does I/O), then choose cuts, exits and codecs (``planner.py``, pure)."""
