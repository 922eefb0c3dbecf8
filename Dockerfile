# syntax=docker/dockerfile:1
# adbeacon's image: built in the official Rust image, run as a non-root user on Debian slim.
#
#   docker build -t adbeacon .        (docker-compose.yml builds it as the adbeacon service)

# ---- build ------------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS build
WORKDIR /src
# Only what the binary is built from (the SQL is compiled in with include_str!), so a change to
# the docs or tests does not rebuild. The crate registry and target/ are BuildKit cache mounts:
# a change to src/ recompiles adbeacon alone, not its dependencies, and no layer carries them.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY clickhouse ./clickhouse
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin adbeacon \
    && install -m 0755 target/release/adbeacon /usr/local/bin/adbeacon

# ---- run --------------------------------------------------------------------------------------
FROM debian:bookworm-slim
# The binary needs nothing but glibc (it speaks plain http to ClickHouse and Redis: no TLS, so no
# CA certificates either).
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/adbeacon --shell /usr/sbin/nologin adbeacon \
    && install -d -o adbeacon -g adbeacon -m 0750 /var/lib/adbeacon
COPY --from=build /usr/local/bin/adbeacon /usr/local/bin/adbeacon

# DATA_DIR holds the IP-hash key (losing it changes every unique count), the write-ahead log
# (acknowledged events not yet in ClickHouse) and dead-letter files: keep it on a volume.
ENV DATA_DIR=/var/lib/adbeacon \
    HOST=0.0.0.0 \
    PORT=8080 \
    LOG_FORMAT=json
VOLUME ["/var/lib/adbeacon"]
USER adbeacon:adbeacon
WORKDIR /var/lib/adbeacon
EXPOSE 8080

# The slim image has no curl or wget, and adbeacon has no health-check mode; rather than add a
# package (and its CVEs) for this, bash (essential in Debian) sends GET /healthz over /dev/tcp and
# the check passes on a 200 status line.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /healthz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]

# SIGTERM (docker stop) flushes the buffer before exit; give it SHUTDOWN_TIMEOUT (30s) and more:
# `docker stop -t 60`, `docker run --stop-timeout 60` (docker's own default is 10 s), or
# docker-compose.yml's stop_grace_period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["adbeacon"]
CMD ["serve"]
