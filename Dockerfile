# autosleepd: small, non-root, pinned base. Build: docker build -t autosleepd .
FROM python:3.12.7-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY autosleepd ./autosleepd
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12.7-slim-bookworm
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin autosleepd
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
ENV AUTOSLEEPD_PORT=8080 AUTOSLEEPD_LOG_FORMAT=json
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/autosleepd/healthz', timeout=2)"]
ENTRYPOINT ["autosleepd"]
