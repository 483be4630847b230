"""Serving: an OpenAI-compatible HTTP server over the router, and export to other serving engines."""
