"""`make bench`: side-by-side benchmark ratios (see bench/run_all.py)."""
