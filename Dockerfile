# syntax=docker/dockerfile:1
FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080 \
    GATEWAY_DATA_DIR=/data
RUN useradd --system --uid 10001 --home-dir /data --create-home gateway \
    && python -m venv /opt/venv && pip install --upgrade pip
WORKDIR /app
# Dependencies first, so a code change does not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir app && touch app/__init__.py && pip install . && pip uninstall -y llm-gateway && rm -rf app
COPY alembic.ini ./
COPY app ./app
COPY migrations ./migrations
# Editable, so the migrations/ folder beside the package is where `llm-gateway migrate` finds it.
RUN pip install --no-deps -e . && python -m compileall -q app
COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
USER gateway
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GATEWAY_PORT', '8080'), timeout=2)"]
# SIGTERM stops accepting, lets in-flight requests and streams finish (GATEWAY_SHUTDOWN_TIMEOUT_S),
# then flushes the usage queue.
STOPSIGNAL SIGTERM
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["serve"]
