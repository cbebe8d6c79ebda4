# mailrelay container image: `docker build -t mailrelay .`
# Configuration: mount a file at /etc/mailrelay/mailrelay.yaml and point MAILRELAY_CONFIG at it, e.g.
#   -v $PWD/mailrelay.yaml:/etc/mailrelay/mailrelay.yaml:ro -e MAILRELAY_CONFIG=/etc/mailrelay/mailrelay.yaml;
# without one the image serves the embedded default (one `blackhole` relay).
# It listens on 0.0.0.0:8080 as the numeric user 10001 (`mailrelay`, no home, no shell).
# CI builds and runs it: scripts/container-smoke.

FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/mailrelay
COPY requirements.lock ./
RUN /opt/mailrelay/bin/pip install --no-cache-dir --disable-pip-version-check -r requirements.lock
COPY pyproject.toml README.md ./
COPY app ./app
COPY schemas ./schemas
COPY relays ./relays
RUN /opt/mailrelay/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps .

FROM python:3.11-slim
# A passwd entry for the service's uid: the pipe, maildrop and dovecot relays
# look themselves up (HOME, USER, LOGNAME of the commands they run).
RUN groupadd --system --gid 10001 mailrelay \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin mailrelay \
    && mkdir -p /etc/mailrelay
COPY --from=build /opt/mailrelay /opt/mailrelay
# sendmail(8) for programs in the image (cron jobs, PHP's mail()): `mailrelay sendmail`, configured by
# MAILRELAY_URL, MAILRELAY_RELAY, MAILRELAY_API_KEY or /etc/mailrelay/sendmail.conf.
RUN ln -s /opt/mailrelay/bin/sendmail /usr/sbin/sendmail \
    && ln -s /opt/mailrelay/bin/sendmail /usr/lib/sendmail
ENV PATH=/opt/mailrelay/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=2)"]
# Exec form: mailrelay is PID 1 and gets SIGTERM itself (it drains, then exits 0).
ENTRYPOINT ["mailrelay"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
