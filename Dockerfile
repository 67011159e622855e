# Two stages: the build stage installs the locked dependencies and the gateway's own wheel into a venv;
# the image gets that venv, the migrations and nothing else (no compiler, no source tree, no build tools).
# Every dependency is the exact version in requirements.lock, each file checked against its hash, so the
# same commit builds the same environment. For a byte-stable base too, pin it by digest:
# docker build --build-arg PYTHON_IMAGE=python:3.11-slim@sha256:<digest> .
# No `# syntax=` line: the builder's own Dockerfile frontend reads this file, so a build fetches no
# frontend image and works wherever the base image can be had (deploy/debian-python-base.sh makes one
# from Debian's packages where Docker Hub cannot be reached).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies first, so a code change does not reinstall them.
COPY requirements.lock requirements-build.lock ./
RUN /opt/venv/bin/pip install --require-hashes --no-deps -r requirements.lock -r requirements-build.lock
COPY pyproject.toml README.md ./
COPY app ./app
# A regular (not editable) install: the package's files are copied into the venv. The build backend and
# pip go after it (~20 MB): nothing installs at run time.
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation . \
    && /opt/venv/bin/python -m pip uninstall -y setuptools pip \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080 \
    GATEWAY_DATA_DIR=/data \
    GATEWAY_MIGRATIONS_DIR=/opt/llm-gateway/migrations
RUN useradd --system --uid 10001 --home-dir /data --create-home gateway
COPY --from=build /opt/venv /opt/venv
COPY migrations /opt/llm-gateway/migrations
COPY docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
WORKDIR /data
USER gateway
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GATEWAY_PORT', '8080'), timeout=2)"]
# SIGTERM stops accepting, lets in-flight requests and streams finish (GATEWAY_SHUTDOWN_TIMEOUT_S),
# then flushes the usage queue.
STOPSIGNAL SIGTERM
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["serve"]
