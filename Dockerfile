# The qwit-worker image of docker-compose.yml: QWIT and the samples.
FROM python:3.12.8-slim-bookworm

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY qwit ./qwit
RUN pip install .
COPY samples ./samples

USER nobody
CMD ["qwit-worker", "samples.order.flows"]
