"""Talking to Feishu: the API client, the outbox sender, the long connection and the Bitable write-back."""
