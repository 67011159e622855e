"""llm-gateway: an OpenAI-compatible gateway that meters every call's tokens and cost."""
