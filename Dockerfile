# The pyflannel image: the agent (flannel/flanneld), flannelctl, the CNI plugin (flannel-cni) and the
# compose lab's test pod (flannel-test-pod), with the kernel-facing tools they call (iproute2,
# iptables, nftables), Debian's CNI plugins (bridge, host-local, portmap) and iperf3 for the pods.
# Used by docker-compose.yml and deploy/kube-flannel.yml (see docs/docker.md, docs/kubernetes.md).
#
#   docker build -t pyflannel:0.1.0 .          (scripts/compose does this, and everything it needs)
#
# Two stages: the builder has the compiler and Python headers (the udp C fast path is an extension
# built when the project is installed) and installs the project into a venv; the final image gets
# that venv and nothing else of the builder — no compiler, no wheelhouse.
#
# Offline builds: `pip install` inside a container may not reach PyPI (no index, or a CA the
# container does not trust). scripts/compose fills deploy/docker/wheelhouse/ with wheels built on the
# host; when that directory holds wheels, pip installs only from it (--no-index). When it holds none
# (a plain `docker build` on a machine with internet), pip uses PyPI as usual: the same file works.
# The base is Debian's own image; scripts/compose makes it with debootstrap where no registry answers.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS builder
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/pyflannel
ENV PATH=/opt/pyflannel/bin:$PATH
# The dependencies first, in a layer of their own: it is rebuilt only when the wheelhouse changes.
COPY deploy/docker/wheelhouse/ /wheelhouse/
RUN if ls /wheelhouse/*.whl >/dev/null 2>&1; then \
      pip install --no-cache-dir --no-index --find-links=/wheelhouse /wheelhouse/*.whl; \
    fi
WORKDIR /src
# The udp fast path (a C extension, docs/udp.md) is compiled by `pip install .` here; the build fails
# if it is missing, so no image without it is ever produced.
COPY pyproject.toml setup.cfg setup.py README.md ./
COPY flannel ./flannel
COPY backends ./backends
COPY subnet_managers ./subnet_managers
RUN if ls /wheelhouse/*.whl >/dev/null 2>&1; then \
      pip install --no-cache-dir --no-index --find-links=/wheelhouse --no-build-isolation . ; \
    else \
      pip install --no-cache-dir . ; \
    fi \
 && flannel --version && flannel --version | grep -qx "udp fast path: available"

FROM ${BASE_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 iproute2 iptables nftables iputils-ping containernetworking-plugins \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/pyflannel /opt/pyflannel
COPY deploy/docker/pod.sh /usr/local/bin/flannel-test-pod
ENV PATH=/opt/pyflannel/bin:$PATH \
    CNI_PATH=/usr/lib/cni
# fail the build, not the first start, if the venv does not run here
RUN flannel --version && flannel-cni version
CMD ["flannel", "--help"]
