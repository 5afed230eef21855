# keyrotd container image.
#
# Not built here: the development machine has the Docker client but no engine. The test
# `packaging::dockerfile_*` (tests/integration/packaging.rs) checks what can be checked without
# one: every FROM pinned by digest, a non-root USER, the HEALTHCHECK, a release build.
# Build with
#   docker build -t keyrotd .
# and mount an inventory whose [daemon] section has `listen = "0.0.0.0:9477"` (the default is
# loopback, unreachable from outside the container) and a state path under /var/lib/keyrotd:
#   docker run -v $PWD/config.toml:/etc/keyrotd/config.toml:ro -v keyrotd-state:/var/lib/keyrotd \
#     -p 9477:9477 --stop-timeout 60 keyrotd

# Base images are pinned by digest (the multi-arch index digest the tag pointed to; see README
# "Packaging" for where each came from). The tag only documents what the digest is; Docker pulls
# the digest. To update: `docker buildx imagetools inspect rust:1.95-bookworm` (and
# debian:bookworm-slim), then replace both digests.
FROM rust:1.95-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1 AS builder
WORKDIR /src
COPY . .
# The release profile drops debug info (`strip = "debuginfo"` in Cargo.toml): a 32 MB binary.
RUN cargo build --release --locked --bin keyrotd

FROM debian:bookworm-slim@sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --user-group --home-dir /var/lib/keyrotd --shell /usr/sbin/nologin keyrotd \
    && install -d -o keyrotd -g keyrotd -m 0700 /var/lib/keyrotd \
    && install -d -m 0755 /etc/keyrotd
COPY --from=builder /src/target/release/keyrotd /usr/bin/keyrotd
# Not root: the system user created above; it owns only the state volume.
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
