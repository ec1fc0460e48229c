# A Debian bookworm image with QEMU (user and system mode), etcd and RAUC that
# runs exactly the scripts CI runs: .ci/run, the README's test command.
#   docker build -t edgekey .
#   docker run --rm edgekey                        # make test: lint, host tests, the ARM
#                                                  # tier and the agent under qemu-arm-static
#   docker run --rm --privileged edgekey board     # make test-board: the system-mode board
#                                                  # (loop devices for RAUC's slots)
# The Debian packages come from tools/setup-host.sh, the same script the Makefile calls;
# the armhf root filesystems and the board are built by the first run (about 30 s) and
# cached in the container's ~/.cache/edgekey.
FROM debian:bookworm

ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends make python3 python3-venv git ca-certificates \
 && rm -rf /var/lib/apt/lists/*

COPY tools/setup-host.sh /tmp/setup-host.sh
RUN bash /tmp/setup-host.sh && rm -rf /var/lib/apt/lists/* /tmp/setup-host.sh

WORKDIR /src/edgekey
COPY . .

ENTRYPOINT ["bash", ".ci/run"]
CMD []
