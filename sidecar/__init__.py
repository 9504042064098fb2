"""rankside sidecar: one per node, between the workers and everyone who watches them."""
