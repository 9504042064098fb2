"""Metrics: the workers' pushed series, their decoding and exposition, the sidecar's own."""
