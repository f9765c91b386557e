"""Alerting and reporting: the alert router, alert buttons, alert cards, the daily report, the canary and the report scheduler."""
