"""The rankside command line: options, serve, run and the client commands."""
