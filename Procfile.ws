# One process: the worker holds Feishu's long connection (FEISHU_CONNECTION=ws, see README).
# The web process is optional in this mode (health checks and metrics only).
worker: FEISHU_CONNECTION=ws opsbot worker
