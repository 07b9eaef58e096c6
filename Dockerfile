# syntax=docker/dockerfile:1
# flame's analysis-container base image. Build it from the repository root:
#
#     docker build -t flame:0.1.0 .
#
# Without a registry, build on the stand-in base of docker/standin-base.sh (docs/how-to/containers.md).
# An analysis image is FROM this one plus the analysis's code and requirements (`flame init`
# writes its Dockerfile).
# Every step that installs something calls docker/install.sh, which tests/test_container.py
# runs too: the smoke test replays this file's FROM/COPY/ENV/RUN/WORKDIR/USER/ENTRYPOINT lines
# and refuses a RUN it cannot replay, so the image and the test cannot drift apart.
# No secret is baked in: tokens and keys come at run time (FLAME_* variables or mounted files).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- stage 1: the wheel, built from the local source; build tools stay in this stage ------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY templates ./templates
COPY examples ./examples
COPY docker ./docker
RUN sh docker/install.sh wheel /wheels

# --- stage 2: the runtime image -------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLAME_LOG_FORMAT=json
# The install script and the wheel's checksum are copied, not only mounted: podman/buildah
# do not key their layer cache on what a RUN --mount brings, so a changed script or wheel
# must change a layer before the install step, or the image would silently stay stale.
COPY docker/install.sh docker/entrypoint /usr/local/share/flame/
COPY --from=wheel /wheels/SHA256SUMS /usr/local/share/flame/wheel.sha256
RUN --mount=type=bind,from=wheel,source=/wheels,target=/tmp/flame-wheels \
    sh /usr/local/share/flame/install.sh install /tmp/flame-wheels
WORKDIR /app
USER 10001:10001
# Python turns SIGINT into a clean stop even as PID 1, where SIGTERM would be ignored.
STOPSIGNAL SIGINT
ENTRYPOINT ["flame-entrypoint"]
