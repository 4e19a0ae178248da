"""Where samples come from: folders and manifests (later: work units, WebDataset tars, Parquet)."""
