# A Debian bookworm container that runs exactly what CI runs (.ci/run:
# `make test`: lint, host tests, and the emulated-ARM tier under
# qemu-arm-static). Needs no privileges: qemu-user is invoked directly, no
# binfmt registration. Usage:
#   docker build -t edgekey . && docker run --rm edgekey
FROM debian:bookworm

ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends make python3 python3-venv git ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# The host packages the project needs (qemu-user-static, mmdebstrap, socat),
# installed by the same script the Makefile calls.
COPY tools/setup-host.sh /tmp/setup-host.sh
RUN bash /tmp/setup-host.sh && rm -rf /var/lib/apt/lists/* /tmp/setup-host.sh

WORKDIR /src/edgekey
COPY . .

CMD ["bash", ".ci/run"]
