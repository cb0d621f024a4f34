# trio-tproxy sidecar image.  Needs NET_ADMIN in the pod, nothing on the node.
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables iproute2 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Only the runtime package: the test lab (lab/, tests/, fuzz/, benchmarks/) stays out
# of the image (.dockerignore too), and `trio-tproxy demo` says where it lives instead.
COPY pyproject.toml README.md ./
COPY trio_tproxy ./trio_tproxy
RUN pip install --no-cache-dir . && rm -rf /src
# Root inside the container's user namespace is needed only for NET_ADMIN;
# the pod spec drops every other capability.
ENTRYPOINT ["trio-tproxy"]
CMD ["run", "--cert", "/etc/trio-tproxy/tls.crt", "--key", "/etc/trio-tproxy/tls.key", \
     "--ca-cert", "/etc/trio-tproxy/ca.crt"]
