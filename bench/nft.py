"""libnftables, in-process, through ctypes (no `nft` process is ever started).

A context's netlink socket is opened by `nft_ctx_new` and stays bound to the network namespace of the
thread that created it: make an `Nft` inside the namespace it is for (bench.accounting enters job namespaces for it),
use it there, close it before leaving. Output is JSON (NFT_CTX_OUTPUT_JSON, what `nft -j` prints).
"""

from __future__ import annotations

import ctypes
import json
import threading
from typing import Any

NFT_CTX_DEFAULT = 0
NFT_CTX_OUTPUT_JSON = 1 << 4

_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


class NftError(Exception):
    """A command failed: `cmd` (first line), the library's error text, and whether it means "no such
    table/chain/object" (ENOENT) or "already exists" (EEXIST)."""

    def __init__(self, cmd: str, error: str) -> None:
        self.cmd = cmd
        self.error = error.strip()
        self.not_found = "No such file or directory" in error
        self.exists = "File exists" in error
        first = self.error.splitlines()[0] if self.error else "failed"
        super().__init__(f"nft {cmd.strip().splitlines()[0]!r}: {first}")


def library() -> ctypes.CDLL:
    """libnftables.so.1, loaded once, with the prototypes we use."""
    global _lib
    with _lib_lock:
        if _lib is None:
            lib = ctypes.CDLL("libnftables.so.1", use_errno=True)
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            lib.nft_ctx_free.restype = None
            lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_output_set_flags.restype = None
            lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
            for fn in (lib.nft_ctx_buffer_output, lib.nft_ctx_buffer_error):
                fn.restype = ctypes.c_int
                fn.argtypes = [ctypes.c_void_p]
            for fn in (lib.nft_ctx_get_output_buffer, lib.nft_ctx_get_error_buffer):
                fn.restype = ctypes.c_char_p
                fn.argtypes = [ctypes.c_void_p]
            lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            _lib = lib
        return _lib


class Nft:
    """One libnftables context in the calling thread's network namespace. Not thread-safe."""

    def __init__(self) -> None:
        self._lib = library()
        ctx = self._lib.nft_ctx_new(NFT_CTX_DEFAULT)
        if not ctx:
            raise NftError("nft_ctx_new", "cannot create a libnftables context (out of memory or no netlink)")
        self._ctx: int | None = ctx
        self._lib.nft_ctx_output_set_flags(ctx, NFT_CTX_OUTPUT_JSON)
        self._lib.nft_ctx_buffer_output(ctx)
        self._lib.nft_ctx_buffer_error(ctx)

    def run(self, cmd: str) -> list[dict[str, Any]]:
        """Run `cmd` (nft syntax; several commands in one buffer are ONE transaction) and return the
        `nftables` array of the JSON output ([] for commands that print nothing). NftError on failure."""
        if self._ctx is None:
            raise NftError(cmd, "context closed")
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, cmd.encode())
        out = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
        err = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
        if rc != 0:
            raise NftError(cmd, err.decode(errors="replace") or f"failed (rc {rc})")
        text = out.decode(errors="replace").strip()
        if not text:
            return []
        try:
            items: list[dict[str, Any]] = json.loads(text)["nftables"]
        except (ValueError, KeyError, TypeError) as e:
            raise NftError(cmd, f"unreadable JSON output: {e}") from e
        return items

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> Nft:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
