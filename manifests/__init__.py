"""Parquet manifests of a run: their schemas, atomic part files, and the DuckDB catalog over them."""
