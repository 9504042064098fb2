"""The node server: the workers of one node, their connections, calls, stalls and dumps."""
