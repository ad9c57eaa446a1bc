"""Training, evaluation and export of the gateway's prompt router (see README.md)."""
