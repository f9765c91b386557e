"""Stand-ins for tests and the demo: the fake Feishu server (HTTP and long connection), its card rules, and webhook event builders. Production code never imports these."""
