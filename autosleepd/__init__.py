"""autosleepd: a reverse-proxy sidecar that puts an idle vLLM server to sleep and wakes it on demand."""

__version__ = "0.1.0"
