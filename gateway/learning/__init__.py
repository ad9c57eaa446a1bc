"""The router learns from the traffic it routes (policy: ``routes.<name>.learning``).

* :mod:`~gateway.learning.examples`: what is kept of a routed request (embedding, surface
  features, score, which side answered: never the text) and the labelled examples;
* :mod:`~gateway.learning.shadow`: a sampled share of answers is also asked of the other
  model of the pair and judged, off the request path, within a daily budget;
* :mod:`~gateway.learning.learned`: a router learnt from the labels, its fitting and
  evaluation (``gateway router learn``), and the versions a running gateway serves;
* ``POST /v1/feedback`` (gateway/api/feedback.py): a caller labels its own requests.
"""
