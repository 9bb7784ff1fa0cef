# The gateway image (CPU torch for the embedded engine; GPU tiers run in the vLLM container).
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY policies ./policies
COPY backends ./backends
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -e '.[local]'
EXPOSE 8000
CMD ["gateway", "serve", "--config", "/etc/memgate/gateway.yaml", "--host", "0.0.0.0"]
