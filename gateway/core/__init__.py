"""The gateway's own request and answer types, independent of any wire format."""
