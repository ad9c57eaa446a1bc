"""policies.yaml: its schema, loading with line-accurate validation, and hot reload."""
