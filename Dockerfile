# Build stage: the release binary.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bin image-queue

# Run stage: the binary, redis-server for `up`, and curl for healthchecks.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl redis-server \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/image-queue /usr/local/bin/image-queue
WORKDIR /data
EXPOSE 3001
ENTRYPOINT ["image-queue"]
CMD ["up", "--listen", "0.0.0.0:3001"]
