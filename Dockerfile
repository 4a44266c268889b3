# syntax=docker/dockerfile:1
#
# The dossier binary in a small Debian image. Build: `docker build -t dossier .`
# (docker-compose.yml does it for you). Needs BuildKit (the default builder) for
# the cache mounts.

# ---- build ----------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
# The cache mounts keep the crates.io download and compiled dependencies between
# builds. Cache mounts are not part of the image, so the binary is copied out in
# the same step. --locked: build exactly what Cargo.lock says.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin dossier \
 && cp target/release/dossier /usr/local/bin/dossier

# ---- run ------------------------------------------------------------------
FROM debian:bookworm-slim
# ca-certificates: TLS to S3 (AWS), Postgres or RabbitMQ outside the compose net.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# A fixed, unprivileged user; its home is the working directory, so the default
# DOSSIER_BLOB_STORE (file://./data/blobs) and a mounted .env land there.
RUN useradd --system --uid 10001 --user-group --create-home \
        --home-dir /var/lib/dossier --shell /usr/sbin/nologin dossier
COPY --from=builder /usr/local/bin/dossier /usr/local/bin/dossier
USER dossier
WORKDIR /var/lib/dossier
# Inside a container the API must listen on all interfaces to be reachable.
ENV DOSSIER_HTTP_ADDR=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["dossier"]
CMD ["serve"]
