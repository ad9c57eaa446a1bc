"""Services the gateway runs beside itself (the embedded Redis) and its client for them."""
