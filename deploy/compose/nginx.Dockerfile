# Debian's nginx for the Compose demo's TLS proxy (deploy/compose/nginx.conf).
# BASE: any Debian bookworm image with apt (the demo's test uses its debootstrap base).
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light >/dev/null \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /etc/nginx/sites-enabled/*
CMD ["nginx", "-g", "daemon off;"]
