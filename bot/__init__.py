"""opsbot: the Feishu chatbot. Subpackages by concern (web, chat, alerting, feishu, ops, standins); see README, "Code layout"."""
