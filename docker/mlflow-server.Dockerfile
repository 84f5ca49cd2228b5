# syntax=docker/dockerfile:1
# The tracking server's image: MLflow with the PostgreSQL driver (psycopg2) and boto3 baked in.
# MLflow's own compose example starts ghcr.io/mlflow/mlflow and pip-installs both at every start:
# slower, and a start that depends on a package index being up. docker/compose.yaml builds this
# image for the server and for the one-shot `mlflow db upgrade`, passing the MLflow version it
# shares with the project image (docker/Dockerfile).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG MLFLOW_VERSION=3.17.2

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN pip install "mlflow==${MLFLOW_VERSION}" "psycopg2-binary>=2.9,<3" "boto3>=1.34,<2"

# The server keeps nothing on local disk (runs in PostgreSQL, artifacts in the bucket); a home
# of its own for what libraries cache.
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin mlflow
USER 10001:10001
WORKDIR /home/mlflow

EXPOSE 5000
RUN mlflow --version

CMD ["mlflow", "server", "--help"]
