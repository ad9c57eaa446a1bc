"""policies.yaml: its schema, and loading it with every problem named by field and line (reloads: ``gateway.runtime``)."""
