# The gateway's images, one Dockerfile, two targets (the Helm chart's image.variant):
#   docker build --target slim -t memgate:0.1.0-slim .   remote tiers only (openai, vllm kinds): no torch
#   docker build --target full -t memgate:0.1.0-full .   + the embedded local engine (CPU torch)
# Both run as a non-root user and need nothing writable but /tmp.
FROM python:3.11-slim AS base
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY policies ./policies
COPY backends ./backends
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin memgate
EXPOSE 8000

FROM base AS slim
RUN pip install '.[remote]'
USER 10001
CMD ["gateway", "serve", "--config", "/etc/memgate/gateway.yaml", "--host", "0.0.0.0"]

FROM base AS full
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu '.[local]'
USER 10001
CMD ["gateway", "serve", "--config", "/etc/memgate/gateway.yaml", "--host", "0.0.0.0"]
