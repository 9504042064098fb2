"""A client of the sidecar's HTTP API, for one node or a whole job."""
