"""Data layer: URL lists, download, Parquet contracts and shard IO. Imports nothing downstream."""
