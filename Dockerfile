# The image deploy/kubernetes/deployment.yaml names: the service, its runtime requirements and the model
# registry; no tests, no tools. Build: `docker build -t credit-scoring:1.0.0 .` (or podman/buildah).
#
# BASE is any Debian-based image with Python 3.11 (.python-version) and its venv module: the official
# slim image by default; `make image` (deploy/image/build) builds on one made from Debian packages alone,
# for where no registry can be reached.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# For a build behind a TLS-intercepting proxy (pip reads PIP_CERT from the environment).
ARG PIP_CERT
COPY requirements.txt /tmp/requirements.txt
RUN python3 -m venv /venv && /venv/bin/pip install --quiet -r /tmp/requirements.txt

FROM ${BASE}
# A user of its own, with no home and no shell; the same uid/gid the Kubernetes manifest runs as.
RUN groupadd --gid 10001 app && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin app
COPY --from=build /venv /venv
WORKDIR /app
COPY Procfile ./
COPY service ./service
COPY artifacts ./artifacts
# var/: the embedded SQLite file and `make report`'s output, when no DATABASE_URL is given.
RUN mkdir var && chown app:app var
ENV PATH=/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PORT=8000
USER 10001:10001
EXPOSE 8000
# The Procfile's web: line, exec'd: the service (python -m service.web, uvicorn's supervisor) is PID 1 and
# gets the SIGTERM itself; a shell left in between would swallow it.
CMD ["bash", "-c", "eval exec \"$(sed -n 's/^web: //p' Procfile)\""]
