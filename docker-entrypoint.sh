#!/bin/sh
# Apply the database migrations, then run the gateway (or any other llm-gateway command).
set -e
if [ "$1" = "serve" ]; then
    llm-gateway migrate
fi
exec llm-gateway "$@"
