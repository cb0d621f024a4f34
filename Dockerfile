# trio-tproxy image: the sidecar (`run`), the admission webhook (`webhook`) and
# `inject`.  Debian bookworm's python3 in a venv: the same FROM builds from the
# public image on any machine and from an offline-made base here
# (lab/image.py; ../shared/CONTAINERS.md).
FROM docker.io/library/debian:bookworm-slim AS build
# The compiled data path (trio_tproxy/_fastpath.c) needs a C compiler at install
# time only: it is built here and the venv is copied into a stage without gcc.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv gcc libc6-dev
WORKDIR /src
# Only the runtime package: the test lab (lab/, tests/, fuzz/, benchmarks/) stays out
# of the image (.dockerignore too), and `trio-tproxy demo` says where it lives instead.
COPY pyproject.toml setup.py README.md ./
COPY trio_tproxy ./trio_tproxy
RUN python3 -m venv /opt/trio-tproxy \
 && /opt/trio-tproxy/bin/pip install --no-cache-dir --disable-pip-version-check . \
 && /opt/trio-tproxy/bin/pip uninstall -y -q pip setuptools \
 && cd / \
 && /opt/trio-tproxy/bin/python -c 'from trio_tproxy import fastpath; assert fastpath.ENABLED, fastpath.WHY_OFF'

FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 nftables iproute2 ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
COPY --from=build /opt/trio-tproxy /opt/trio-tproxy
ENV PATH=/opt/trio-tproxy/bin:$PATH PYTHONDONTWRITEBYTECODE=1
WORKDIR /
# Non-root by default: the webhook and `inject` need nothing more.  The sidecar
# runs as uid 0 (the injected pod spec says runAsUser: 0) with NET_ADMIN alone:
# nft, policy routes, IP_TRANSPARENT and SO_MARK need it, and Kubernetes grants
# added capabilities to root only (no ambient capabilities for other users).
USER 65532:65532
ENTRYPOINT ["trio-tproxy"]
CMD ["--help"]
