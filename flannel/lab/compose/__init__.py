"""The compose lab: the lab's topology (etcd, three hosts with an agent each, a pod per host) as
Docker containers from ``docker-compose.yml``, driven by ``scripts/compose up|down|status|iperf``.

What it needs and makes, in order (each step is timed and skipped when already done):

1. an engine (``engine``): the one ``DOCKER_HOST`` or ``/var/run/docker.sock`` names, else a
   private ``dockerd`` of ours with its own socket and data root, which touches nothing of the
   machine's network (no docker0, no iptables rules, no sysctls);
2. the base image ``debian:bookworm-slim`` (``images``): pulled, else made with debootstrap from the
   machine's Debian mirror and imported;
3. a wheelhouse of the project's dependencies built on the host (``pip wheel``), because pip inside
   a build container may not reach an index;
4. the images (agent image and etcd image) with ``docker build``;
5. ``docker-compose up``, then the pods' health and the pod-to-pod ping matrix (``lab``), with the
   same ``flannel.lab.podtraffic`` code as the namespace lab.

The repository (compose file, Dockerfiles) is an input: this package is installed, the files are not.
"""
