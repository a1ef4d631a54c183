"""``flannelctl doctor``: compare this node's kernel with what the lease store says it should have.

Run on a node, as root, in the node's network namespace. It reads (never writes) the store
(``store.py``), rebuilds the running backend's view of the kernel with the backend's own code
(``check.py``), and sorts the agent's own plan into findings (``diff.py``, pure) that
``findings.py`` renders as text or JSON. Exit status: 0 clean, 1 differences, 2 cannot check.
See docs/doctor.md.
"""

from flannel.doctor.check import CHECKED_BACKENDS, check
from flannel.doctor.findings import EXIT_CANNOT_CHECK, EXIT_CLEAN, EXIT_DIFFERENCES, Finding, LeaseRef, Report
from flannel.doctor.store import StoreView, from_etcd, from_kube

__all__ = ["CHECKED_BACKENDS", "EXIT_CANNOT_CHECK", "EXIT_CLEAN", "EXIT_DIFFERENCES", "Finding", "LeaseRef",
           "Report", "StoreView", "check", "from_etcd", "from_kube"]
