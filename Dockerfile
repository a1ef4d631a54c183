# The pyflannel image: the agent (flannel/flanneld), flannelctl, and the CNI plugin (flannel-cni),
# with the kernel-facing tools they call (iproute2, iptables, nftables) and Debian's CNI plugins
# (bridge, host-local, portmap) for the docker-compose test pods. Used by docker-compose.yml and by
# deploy/kube-flannel.yml (tag it pyflannel:<version>, see docs/docker.md and docs/kubernetes.md).
#
#   docker build -t pyflannel:0.1.0 .
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      iproute2 iptables nftables iputils-ping containernetworking-plugins ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml setup.cfg setup.py README.md ./
COPY flannel ./flannel
COPY backends ./backends
COPY subnet_managers ./subnet_managers
# The udp fast path (a C extension, docs/udp.md) is compiled by `pip install .`; the compiler is
# installed and purged in the same layer, so the image ships the built module but no gcc. The build
# fails if the fast path is missing.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && pip install --no-cache-dir . \
 && apt-get purge -y --auto-remove gcc libc6-dev && rm -rf /var/lib/apt/lists/* \
 && cd / && rm -rf /src \
 && flannel --version && flannel --version | grep -qx "udp fast path: available" && flannel-cni version

COPY deploy/docker/pod.sh /usr/local/bin/flannel-test-pod
WORKDIR /
ENV CNI_PATH=/usr/lib/cni
CMD ["flannel", "--help"]
