# The tocsin image: one image for `tocsin gateway` and `tocsin ingest` (compose.yaml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# What the install needs, and nothing else (.dockerignore keeps the rest out).
COPY pyproject.toml README.md ./
COPY services/ services/
COPY clients/python/src/ clients/python/src/
COPY clients/js/tocsin.js clients/js/tocsin.js
COPY schemas/ schemas/
RUN pip install . && rm -rf /src

COPY deploy/tocsin/healthcheck.py /usr/local/bin/tocsin-healthcheck

# Not root. Nothing is written but the (unused in containers) embedded server's data dir.
RUN useradd --system --uid 10001 --home-dir /home/tocsin --create-home tocsin
USER tocsin
WORKDIR /home/tocsin

ENV TOCSIN_HTTP_HOST=0.0.0.0 \
    TOCSIN_HTTP_PORT=8080 \
    TOCSIN_DATA_DIR=/home/tocsin/.tocsin
EXPOSE 8080

# exec form: tocsin is PID 1 and gets SIGTERM itself (graceful socket close, drain).
ENTRYPOINT ["tocsin"]
CMD ["gateway"]
