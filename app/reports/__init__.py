"""Reports read from the usage rollup: GET /v1/usage, `llm-gateway usage` and the dashboard's data."""
