# syntax=docker/dockerfile:1
# relay: an SMTP relay from legacy applications to Exchange Online (OAuth2), and inbound import.
#
#   docker build -t relay .
#   docker run -v ./relay.yaml:/etc/relay/relay.yaml:ro -v relay-spool:/var/lib/relay/spool \
#     -p 2525:2525 -p 9025:9025 relay
#
# relay.yaml in the container: listen on 0.0.0.0:2525, `admin: {address: "0.0.0.0:9025"}` (the
# health check asks http://127.0.0.1:9025/healthz; set RELAY_HEALTH_URL for another port), and
# `spool: {path: /var/lib/relay/spool}`. Secrets come from the environment (${VAR}) or from
# mounted files (client_secret_file, certificate, federated_token_file). See docs/operations.md.

# Build the project and its dependencies into wheels, so the final image has no build tools.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
# A fixed uid/gid, so files in the spool volume keep one owner across image versions.
RUN groupadd --system --gid 10025 relay \
 && useradd --system --uid 10025 --gid relay --home-dir /var/lib/relay --no-create-home \
      --shell /usr/sbin/nologin relay \
 && install -d -o relay -g relay -m 0750 /var/lib/relay /var/lib/relay/spool \
 && install -d -m 0755 /etc/relay
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/relay-*.whl
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RELAY_HEALTH_URL=http://127.0.0.1:9025/healthz
# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10025:10025
WORKDIR /var/lib/relay
VOLUME ["/var/lib/relay/spool", "/etc/relay"]
# SMTP intake, admin (/healthz /readyz /metrics)
EXPOSE 2525 9025
# relay serve stops on SIGTERM: listeners answer 421, deliveries in flight get 30 s, the spool
# is closed; give it that long (docker stop -t 35, terminationGracePeriodSeconds: 35).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen(os.environ['RELAY_HEALTH_URL'], timeout=4).status != 200)"]
ENTRYPOINT ["relay"]
CMD ["serve", "--config", "/etc/relay/relay.yaml"]
