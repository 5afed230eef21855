# keyrotd container image.
#
# Not built or tested here: the development machine runs no Docker engine. Build with
#   docker build -t keyrotd .
# and mount an inventory whose [daemon] section has `listen = "0.0.0.0:9477"` (the default is
# loopback, unreachable from outside the container) and a state path under /var/lib/keyrotd:
#   docker run -v $PWD/config.toml:/etc/keyrotd/config.toml:ro -v keyrotd-state:/var/lib/keyrotd \
#     -p 9477:9477 --stop-timeout 60 keyrotd

FROM rust:bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin keyrotd

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --user-group --home-dir /var/lib/keyrotd --shell /usr/sbin/nologin keyrotd \
    && install -d -o keyrotd -g keyrotd -m 0700 /var/lib/keyrotd \
    && install -d -m 0755 /etc/keyrotd
COPY --from=builder /src/target/release/keyrotd /usr/bin/keyrotd
USER keyrotd
VOLUME /var/lib/keyrotd
EXPOSE 9477
# SIGTERM (Docker's default) finishes or parks the step in flight; allow time with --stop-timeout.
STOPSIGNAL SIGTERM
# No curl in the image: bash's /dev/tcp speaks enough HTTP/1.0 for /healthz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9477 && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["/usr/bin/keyrotd"]
CMD ["run", "--config", "/etc/keyrotd/config.toml"]
