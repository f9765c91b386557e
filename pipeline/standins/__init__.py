"""Stand-ins for tests and the demo: the Coze simulator and its asset server."""
