# syntax=docker/dockerfile:1
#
# prompt-cache-exporter container image.
#
#   docker build -t prompt-cache-exporter .
#   docker run -p 9819:9819 -v $PWD/config.toml:/etc/prompt-cache-exporter/config.toml:ro \
#     -e VENICE_API_KEY prompt-cache-exporter
#
# The same image runs the demo upstream: `prompt-cache-exporter simulate ...`
# (see the `demo` profile of docker-compose.yml).

# Pinned to a patch release of Python 3.11 (the project's minimum) on Debian
# bookworm, the distribution CI runs on. Bump deliberately; for byte-for-byte
# reproducible builds pin the digest too (python:3.11.14-slim-bookworm@sha256:...).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- build: turn the project and its dependencies into wheels ------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# Only what the package build needs (.dockerignore keeps the rest out).
COPY pyproject.toml README.md ./
COPY exporter ./exporter
RUN pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore --upgrade pip \
 && pip wheel --no-cache-dir --disable-pip-version-check --wheel-dir /wheels .

# --- runtime: the wheels only, no compiler, no source tree, no build tooling ----
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed, unprivileged user. The data directory is where the SQLite database
# lives (mount a volume there); the config directory is for the read-only config.
RUN groupadd --system --gid 10001 pce \
 && useradd --system --uid 10001 --gid pce --no-create-home \
      --home-dir /var/lib/prompt-cache-exporter --shell /usr/sbin/nologin pce \
 && mkdir -p /var/lib/prompt-cache-exporter /etc/prompt-cache-exporter \
 && chown pce:pce /var/lib/prompt-cache-exporter

COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir --root-user-action=ignore --no-index --find-links=/tmp/wheels \
      /tmp/wheels/prompt_cache_exporter-*.whl \
 && rm -rf /tmp/wheels

USER pce:pce
WORKDIR /var/lib/prompt-cache-exporter
VOLUME ["/var/lib/prompt-cache-exporter"]
EXPOSE 9819

# Liveness from inside the container, with the interpreter the image already
# has (no curl/wget in slim images). Adjust the URL if the exporter listens on
# another port or serves TLS.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9819/healthz', timeout=3)"]

ENTRYPOINT ["prompt-cache-exporter"]
CMD ["run", "--config", "/etc/prompt-cache-exporter/config.toml"]
