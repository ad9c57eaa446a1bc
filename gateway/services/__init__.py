"""Processes the gateway may run beside itself: a private Redis, simulated upstreams."""
