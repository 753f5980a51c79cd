"""OpenAI-compatible gateway: discovery (who serves what), balancing (who gets this
request), transport (moving bytes). Routing comes only from the registry."""
