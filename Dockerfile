# The apitree image: the operator, the gateway proxy and every other command in one binary.
#
#   docker build -t ghcr.io/apitree/apitree:0.1.0 .
#
# Multi-stage: Rust builds in the first stage; the runtime is distroless (glibc, CA
# certificates, no shell, no package manager) and runs as the non-root user 65532, which the
# chart's securityContext also requires. TLS uses rustls with bundled roots, so no OpenSSL.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# No sqlx query macros: the build needs no database. The production profile is release with
# whole-program optimisation (Cargo.toml).
RUN cargo build --profile production --locked --bin apitree

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/production/apitree /usr/local/bin/apitree
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/apitree"]
CMD ["operator"]
