# autosleepd: small, non-root, pinned base. Build: docker build -t autosleepd:0.1.0 .
# BASE is any Debian-like image with python3 and its venv module at the same path in both
# stages; `make integration` builds one from Debian packages where no image can be pulled.
# PIP_INDEX_URL, PIP_FIND_LINKS and PIP_NO_INDEX pass through to pip (an offline wheelhouse).
ARG BASE=python:3.12.7-slim-bookworm

FROM ${BASE} AS build
ARG PIP_INDEX_URL PIP_FIND_LINKS PIP_NO_INDEX
RUN python3 -m venv /opt/autosleepd
WORKDIR /src
COPY pyproject.toml README.md ./
COPY autosleepd ./autosleepd
RUN /opt/autosleepd/bin/pip install --no-cache-dir --disable-pip-version-check . \
    && find /opt/autosleepd -name __pycache__ -prune -exec rm -rf {} +

FROM ${BASE}
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin autosleepd
COPY --from=build /opt/autosleepd /opt/autosleepd
ENV PATH=/opt/autosleepd/bin:$PATH AUTOSLEEPD_PORT=8080 AUTOSLEEPD_LOG_FORMAT=json
USER 10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/autosleepd/healthz', timeout=2)"]
ENTRYPOINT ["autosleepd"]
