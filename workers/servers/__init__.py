"""The project's own OpenAI-compatible engine servers (embedding and transformers)."""
