"""Reconciliation of the gateway's metering with OpenAI's own usage and costs (README, Reconciliation)."""
