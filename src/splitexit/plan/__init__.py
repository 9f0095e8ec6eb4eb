"""Planning: measure a package's profile (``measure.py``, torch and clocks; records in ``profile.py``), then
choose cuts, exits and codecs for a cluster (``search.py``, pure) and write the cluster file that serves the
plan (``result.py``)."""
