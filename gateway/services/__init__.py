"""Services the gateway can run beside itself: the embedded Redis."""
