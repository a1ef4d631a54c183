# etcd for the compose lab, from Debian's own package (etcd-server/etcd-client 3.4), so the lab
# needs no registry but Debian's. The agents speak the etcd v3 API, which 3.4 serves.
#
#   docker build -t pyflannel-etcd:3.4 -f deploy/docker/etcd.Dockerfile deploy/docker
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends etcd-server etcd-client \
 && rm -rf /var/lib/apt/lists/* \
 && etcd --version
EXPOSE 2379 2380
CMD ["etcd"]
