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
COPY pyproject.toml setup.cfg README.md ./
COPY flannel ./flannel
COPY backends ./backends
COPY subnet_managers ./subnet_managers
RUN pip install --no-cache-dir . \
 && cd / && rm -rf /src \
 && flannel --version && flannel-cni version

COPY deploy/docker/pod.sh /usr/local/bin/flannel-test-pod
WORKDIR /
ENV CNI_PATH=/usr/lib/cni
CMD ["flannel", "--help"]
