# The qwit-worker image of docker-compose.yml: QWIT and the samples.
FROM python:3.12.8-slim-bookworm

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
# Dependencies first, at the versions deploy/constraints.txt pins: this layer
# is rebuilt when the pins change, not when the code does.
COPY deploy/constraints.txt ./deploy/constraints.txt
RUN pip install --no-deps -r deploy/constraints.txt
# Then QWIT itself, on those dependencies only (pip check fails the build if
# the pins no longer cover what pyproject.toml requires).
COPY pyproject.toml README.md ./
COPY qwit ./qwit
RUN pip install --no-deps . && pip check
COPY samples ./samples

USER nobody
CMD ["qwit-worker", "samples.order.flows"]
