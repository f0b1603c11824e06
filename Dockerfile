# syntax=docker/dockerfile:1
# A Clustera kernel. Build: docker build -t my-kernel .   Run: docker run --env-file .env my-kernel

# Pinned slim Python: small, and the same interpreter on every rebuild.
FROM python:3.12.8-slim-bookworm

# uv from its official image, pinned like everything else.
COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /bin/uv

# Compile bytecode at build time (faster start), copy instead of hard-linking from the cache mount,
# and never install the dev dependency group (tests, embedded broker) into the image.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_DEV=1 \
    PYTHONUNBUFFERED=1

WORKDIR /app

# Optional dependencies from pyproject.toml, e.g. --build-arg EXTRAS="--extra database --extra http".
ARG EXTRAS=""

# Dependencies first, from the lock file only: this layer stays cached until uv.lock changes.
# hadolint ignore=SC2086
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    uv sync --locked --no-install-project $EXTRAS

# The kernel itself (add your own modules here if you split main.py).
COPY main.py ./

# Run as an unprivileged user; the certificate directory is created under its own /tmp.
RUN useradd --system --uid 10001 --no-create-home kernel
USER 10001

ENV PATH="/app/.venv/bin:$PATH"

# Liveness from /healthz when KERNEL_HTTP_PORT (or the platform's PORT) is set; without either the
# kernel serves no HTTP and the check passes: a kernel that stops working exits and is restarted.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('KERNEL_HTTP_PORT') or os.environ.get('PORT'); sys.exit(port and urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status != 200)"]

# Exec form: python is PID 1 and receives SIGTERM itself, so shutdown commits and leaves the group.
CMD ["python", "main.py"]
