"""Operator tools: the opsbot CLI, doctor, demo, terminal card renderer, report command."""
