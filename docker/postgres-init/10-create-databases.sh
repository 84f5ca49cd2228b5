#!/bin/bash
# Runs once, when the postgres container starts on an empty data volume (the image runs every
# script in /docker-entrypoint-initdb.d then, and never again). Two databases, each owned by a
# role of its own: `mlflow` for the tracking server, `optuna` for the search workers, so a
# worker's password opens the study storage and nothing else.
#
# The passwords arrive as psql variables and are quoted by psql (:'name'), never pasted into
# SQL by the shell, so any character is safe in them.
set -euo pipefail

: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD in docker/.env}"
: "${OPTUNA_DB_PASSWORD:?set OPTUNA_DB_PASSWORD in docker/.env}"

psql --no-psqlrc -v ON_ERROR_STOP=1 \
    --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
    -v mlflow_password="${MLFLOW_DB_PASSWORD}" \
    -v optuna_password="${OPTUNA_DB_PASSWORD}" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;

CREATE ROLE optuna LOGIN PASSWORD :'optuna_password';
CREATE DATABASE optuna OWNER optuna;
REVOKE ALL ON DATABASE optuna FROM PUBLIC;
SQL
