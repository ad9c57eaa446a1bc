"""After the answer: the request log line and the metrics."""
