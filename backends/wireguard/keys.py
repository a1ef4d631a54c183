"""WireGuard keys: the node's private key file and the base64/hex forms (reference §9.4).

Curve25519 comes from the ``cryptography`` package (X25519): it derives the public key in-process,
so neither key generation nor derivation needs the ``wg`` binary (which a wireguard-go-only host
might not have). Keys travel as their standard base64 text everywhere in this backend (leases,
logs, the peer model) and are converted to lowercase hex only at the UAPI boundary.

The key file (``/run/flannel/wgkey`` or ``$WIREGUARD_KEY_FILE``), like flannel:

* missing → generate a key, write its 44-character base64 text without a newline, parent
  directories 0755, the file 0400 (created 0400, never world-readable for a moment);
* present → read it; the same key pair serves both address families and survives restarts, so
  peers need no change when the agent restarts.

**Trailing newline (reference §14.18):** flannel rejects a key file that ends in a newline and
exits. ``wg genkey > wgkey`` writes exactly such a file, so we accept it: surrounding ASCII
whitespace is stripped before parsing (logged once at INFO). Anything else that is not exactly one
base64-encoded 32-byte key is a ``ConfigError`` naming the file. We never rewrite an existing file.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import stat

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from flannel import errors

log = logging.getLogger(__name__)

DEFAULT_KEY_FILE = "/run/flannel/wgkey"
KEY_FILE_ENV = "WIREGUARD_KEY_FILE"
KEY_LEN = 32


def key_file_path(environ: dict[str, str] | None = None) -> str:
    """``$WIREGUARD_KEY_FILE`` if set (even to a relative path, as flannel), else ``/run/flannel/wgkey``."""
    env = os.environ if environ is None else environ
    return env.get(KEY_FILE_ENV) or DEFAULT_KEY_FILE


def parse_key(text: str, what: str = "key") -> bytes:
    """Standard base64 of 32 bytes (44 characters with one ``=``) → raw bytes.

    :raises ValueError: naming ``what`` and the rule it breaks.
    """
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a base64 string, got {type(text).__name__}")
    if len(text) != 44 or not text.endswith("="):
        raise ValueError(f"{what} must be 44 base64 characters (a 32-byte key), got {len(text)} characters")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64") from None
    if len(raw) != KEY_LEN:
        raise ValueError(f"{what} does not decode to 32 bytes")
    return raw


def encode_key(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def b64_to_hex(text: str) -> str:
    """Base64 key → the lowercase hex the UAPI protocol speaks."""
    return parse_key(text).hex()


def hex_to_b64(text: str) -> str:
    """UAPI hex key → base64. :raises ValueError: not 64 hex digits."""
    if len(text) != 2 * KEY_LEN:
        raise ValueError(f"hex key must be 64 hex digits, got {len(text)}")
    return encode_key(bytes.fromhex(text))


def generate_private_key() -> str:
    """A new private key, clamped like ``wg genkey`` (and flannel's wgtypes.GeneratePrivateKey)."""
    raw = bytearray(os.urandom(KEY_LEN))
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return encode_key(bytes(raw))


def public_key(private_b64: str) -> str:
    """The X25519 public key of a base64 private key."""
    priv = X25519PrivateKey.from_private_bytes(parse_key(private_b64, "private key"))
    return encode_key(priv.public_key().public_bytes_raw())


def load_or_create(path: str) -> str:
    """The private key in ``path`` (base64), generating and writing one if the file does not exist.

    :raises errors.ConfigError: the file is unreadable or does not hold one key.
    """
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            content = f.read(4096)
    except FileNotFoundError:
        return _create(path)
    except OSError as e:
        raise errors.ConfigError(f"wireguard key file {path}: cannot read it: {e}") from e
    text = content.strip(" \t\r\n")
    if text != content:
        log.info("wireguard key file %s: ignoring surrounding whitespace/newline (flannel would refuse it)", path)
    try:
        parse_key(text, "private key")
    except ValueError as e:
        raise errors.ConfigError(f"wireguard key file {path}: {e}; it must hold one base64 private key "
                                 f"(e.g. from `wg genkey`), or delete it to have a new one generated") from None
    _warn_if_readable(path)
    return text


def _create(path: str) -> str:
    key = generate_private_key()
    parent = os.path.dirname(path)
    try:
        if parent:
            os.makedirs(parent, mode=0o755, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        try:
            os.write(fd, key.encode("ascii"))
            os.fchmod(fd, 0o400)
        finally:
            os.close(fd)
    except FileExistsError:
        # another process created it between our read and our create: use theirs
        return load_or_create(path)
    except OSError as e:
        raise errors.ConfigError(f"wireguard key file {path}: cannot create it: {e}") from e
    log.info("wireguard: generated a new private key in %s", path)
    return key


def _warn_if_readable(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("wireguard key file %s is accessible by group/others (mode %o); chmod 0400 it",
                    path, stat.S_IMODE(mode))
