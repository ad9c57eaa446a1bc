"""Wire formats, one codec module each: they decode into :mod:`gateway.core.model` and encode back."""
