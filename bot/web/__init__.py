"""The web edge: Flask view, request intake (signature, decryption, dedup), legacy callbacks, gunicorn config and metrics hooks."""
