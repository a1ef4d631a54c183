"""``python -m flannel.cni``: the CNI plugin (what the installed ``flannel`` CNI binary runs)."""

from __future__ import annotations

from flannel.cni.plugin import main

if __name__ == "__main__":
    main()
