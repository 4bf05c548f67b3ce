# syntax=docker/dockerfile:1
# The npm-agent image: the node agent (`npm-agent run` is the entrypoint), with iptables and
# ipset for the iptables dataplane. Built from the repository root:
#
#   docker build -t REGISTRY/npm-agent:0.1.0 .
#
# Stage 1 builds the agent and its eBPF programs as `cargo xtask setup` and `cargo build`
# do on a Debian 12 machine: LLVM 22 for bpf-linker, the nightly toolchain with rust-src for
# the BPF target (npm-agent's build script builds npm-ebpf with it), then a release build.

FROM rust:1.95-bookworm AS build
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends llvm-22-dev libpolly-22-dev libzstd-dev \
 && rm -rf /var/lib/apt/lists/*
RUN rustup toolchain install nightly --profile minimal --component rust-src
# bpf-linker against Debian's LLVM 22 (the version xtask/src/setup.rs pins).
ENV LLVM_PREFIX=/usr/lib/llvm-22 LLVM_SYS_221_PREFIX=/usr/lib/llvm-22
RUN PATH=/usr/lib/llvm-22/bin:$PATH \
    cargo install bpf-linker --version 0.13.0 --no-default-features --features llvm-22 --locked
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --package npm-agent \
 && cp target/release/npm-agent /usr/local/bin/npm-agent \
 && strip --strip-debug /usr/local/bin/npm-agent

# Stage 2: the runtime. iptables (both the nft and the legacy backends, the agent uses the
# node's), ipset, netbase (/etc/protocols, which iptables reads for protocol names),
# ca-certificates (a kubeconfig's API server outside the cluster). The root filesystem is
# mounted read-only by the DaemonSet; nothing here writes to it.
FROM debian:bookworm-slim
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ipset netbase ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/npm-agent /usr/local/bin/npm-agent
# Metrics, /healthz and /readyz (hostNetwork: the node's port).
EXPOSE 10091
ENTRYPOINT ["/usr/local/bin/npm-agent", "run"]
