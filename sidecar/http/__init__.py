"""The HTTP side: the Starlette app, its middleware, routes, OpenAPI and the web page."""
