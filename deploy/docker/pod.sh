#!/bin/sh
# The compose lab's helper (docker-compose.yml). A test "pod" is a network namespace attached to its
# host's namespace by the flannel CNI plugin (bridge + host-local for the agent's subnet), like a
# kubelet would. The pod container shares the host container's network namespace (network_mode:
# service:hostN), so the bridge lands on the "host"; the pod itself is the netns "pod" inside it.
#
#   flannel-test-pod host        hold a host's network namespace: drop its default route (the underlay
#                                is all a host reaches), then wait for SIGTERM
#   flannel-test-pod run         wait for subnet.env, ADD the pod, serve HTTP on :8080 in it, DEL on stop
#   flannel-test-pod ready       exit 0 once the pod has its IPv4 address (the container's healthcheck)
#   flannel-test-pod ip          print the pod's IPv4 address
#   flannel-test-pod ping IP     ping IP from inside the pod
#   flannel-test-pod get IP      fetch http://IP:8080/ from inside the pod
set -eu
NETNS=pod
CONF=${CNI_CONF:-/etc/cni/net.d/10-flannel.conf}
SUBNET_FILE=${SUBNET_FILE:-/run/flannel/subnet.env}
ID=${POD_ID:-$(hostname)}

cni() {
  CNI_COMMAND=$1 CNI_CONTAINERID=$ID CNI_NETNS=/run/netns/$NETNS CNI_IFNAME=eth0 \
    CNI_PATH=${CNI_PATH:-/usr/lib/cni} flannel-cni < "$CONF"
}

case "${1:-run}" in
  host)
    ip route del default 2>/dev/null || true
    trap 'exit 0' TERM INT
    while :; do sleep 3600 & wait $! || true; done
    ;;
  run)
    echo "pod $ID: waiting for $SUBNET_FILE"
    while [ ! -s "$SUBNET_FILE" ]; do sleep 1; done
    ip netns add "$NETNS" 2>/dev/null || true
    ip -n "$NETNS" link set lo up
    cni DEL >/dev/null 2>&1 || true    # a restarted container: start from a clean attachment
    cni ADD
    echo
    ip -n "$NETNS" -4 addr show dev eth0
    trap 'cni DEL; ip netns del "$NETNS"; exit 0' TERM INT
    ip netns exec "$NETNS" python3 -m http.server 8080 --bind 0.0.0.0 >/dev/null 2>&1 &
    wait
    ;;
  ready)
    ip -n "$NETNS" -4 -o addr show dev eth0 2>/dev/null | grep -q inet
    ;;
  ip)
    ip -n "$NETNS" -4 -o addr show dev eth0 | awk '{split($4, a, "/"); print a[1]}'
    ;;
  ping)
    exec ip netns exec "$NETNS" ping -c 3 -W 2 "$2"
    ;;
  get)
    exec ip netns exec "$NETNS" python3 -c "import sys, urllib.request; print(urllib.request.urlopen('http://%s:8080/' % sys.argv[1], timeout=5).status)" "$2"
    ;;
  *)
    echo "usage: $0 host|run|ready|ip|ping IP|get IP" >&2; exit 2
    ;;
esac
