"""``python -m flannel``: the daemon (same as the ``flannel`` / ``flanneld`` commands)."""

from flannel.cli import main

if __name__ == "__main__":
    main()
