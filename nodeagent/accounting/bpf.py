"""The kernel's bpf(2) for the accounting counters: a per-CPU array map and two tc classifier programs.

No compiler and no library: the two programs are a few dozen eBPF instructions assembled here (`program`),
loaded with bpf(BPF_PROG_LOAD) through ctypes and attached by nodeagent.accounting.tc. What they do is
described in nodeagent/accounting/rules.py (the counters' meaning) and here (the instructions).

Every call raises BpfError(errno, what) on failure; the verifier's log is in the message of a failed load.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass
from functools import cache

SYS_BPF = 321  # x86_64 (the only architecture the agent is built for; see pyproject)

# commands
MAP_CREATE = 0
MAP_LOOKUP_ELEM = 1
PROG_LOAD = 5
PROG_GET_NEXT_ID = 11
PROG_GET_FD_BY_ID = 13
MAP_GET_FD_BY_ID = 14
OBJ_GET_INFO_BY_FD = 15

MAP_TYPE_PERCPU_ARRAY = 6
PROG_TYPE_SCHED_CLS = 3
OBJ_NAME_LEN = 16
ATTR_SIZE = 128  # larger than every union member we use; the kernel accepts trailing zeros

# __sk_buff fields (include/uapi/linux/bpf.h)
SKB_LEN = 0
SKB_PKT_TYPE = 4
SKB_DATA = 76
SKB_DATA_END = 80

PACKET_OTHERHOST = 3
PACKET_LOOPBACK = 5
TC_ACT_UNSPEC = -1  # direct action "no verdict": the frame goes on as if the filter were not there
FN_MAP_LOOKUP_ELEM = 1


class BpfError(OSError):
    def __init__(self, err: int, what: str, detail: str = "") -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}{': ' + detail if detail else ''}")
        self.what = what


@cache
def _libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(None, use_errno=True)
    lib.syscall.restype = ctypes.c_long
    return lib


def _sys(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str, detail: str = "") -> int:
    r = _libc().syscall(SYS_BPF, ctypes.c_int(cmd), attr, ctypes.c_uint(ctypes.sizeof(attr)))
    if r < 0:
        err = ctypes.get_errno()
        raise BpfError(err, what, detail)
    return int(r)


def _attr(fmt: str, *values: object, at: int = 0) -> ctypes.Array[ctypes.c_char]:
    buf = ctypes.create_string_buffer(ATTR_SIZE)
    struct.pack_into(fmt, buf, at, *values)
    return buf


def _addr(buf: ctypes.Array[ctypes.c_char]) -> int:
    return ctypes.addressof(buf)


@cache
def possible_cpus() -> int:
    """How many per-CPU slots a per-CPU map has (the kernel's possible CPUs, not the online ones)."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()  # e.g. "0-1" or "0,2-5"
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


# ---------------------------------------------------------------------------------------------- maps

def map_create_percpu_array(name: str, value_size: int, entries: int) -> int:
    """A new per-CPU array of `entries` values (u32 keys); returns its fd (close it when done)."""
    attr = _attr("=IIIII", MAP_TYPE_PERCPU_ARRAY, 4, value_size, entries, 0)
    struct.pack_into(f"={OBJ_NAME_LEN}s", attr, 28, name.encode()[:OBJ_NAME_LEN - 1])
    return _sys(MAP_CREATE, attr, f"creating the BPF map {name}")


def percpu_lookup(map_fd: int, key: int, value_size: int) -> list[bytes]:
    """The value of `key` on every possible CPU."""
    stride = (value_size + 7) & ~7
    k = ctypes.c_uint32(key)
    out = ctypes.create_string_buffer(stride * possible_cpus())
    attr = _attr("=IIQQQ", map_fd, 0, ctypes.addressof(k), _addr(out), 0)
    _sys(MAP_LOOKUP_ELEM, attr, f"reading key {key} of BPF map fd {map_fd}")
    raw = out.raw
    return [raw[i * stride:i * stride + value_size] for i in range(possible_cpus())]


# ---------------------------------------------------------------------------------------------- programs

_INSN = struct.Struct("<BBhi")


@dataclass(frozen=True)
class _I:
    code: int
    dst: int = 0
    src: int = 0
    off: int | str = 0    # a label name: resolved to a jump offset by `assemble`
    imm: int = 0


def assemble(code: list[_I | str]) -> bytes:
    """Instructions and labels (str) -> the kernel's struct bpf_insn array."""
    at: dict[str, int] = {}
    n = 0
    for x in code:
        if isinstance(x, str):
            at[x] = n
        else:
            n += 1
    out = []
    pc = 0
    for x in code:
        if isinstance(x, str):
            continue
        off = x.off if isinstance(x.off, int) else at[x.off] - pc - 1
        out.append(_INSN.pack(x.code, (x.src << 4) | x.dst, off, x.imm))
        pc += 1
    return b"".join(out)


# opcodes (class | size/op | mode/source)
LDX_W, LDX_B, LDX_DW = 0x61, 0x71, 0x79
STX_W, STX_DW = 0x63, 0x7B
MOV_K, MOV_X, ADD_K, ADD_X = 0xB7, 0xBF, 0x07, 0x0F
JEQ_K, JNE_K, JGT_X = 0x15, 0x55, 0x2D
CALL, EXIT, LD_IMM64 = 0x85, 0x95, 0x18
PSEUDO_MAP_FD = 1
R0, R1, R2, R3, R4, R5, R6, R7, R10 = 0, 1, 2, 3, 4, 5, 6, 7, 10


def program(map_fd: int, direction: str, prefix: int, base: int) -> bytes:
    """Count the frame in key base+0 (local: the other end's MAC starts with the 3 octets of `prefix`),
    base+1 (overlay: starts with 02, another node) or base+2 (external: anything else) of the per-CPU map:
    value = (u64 bytes, u64 packets). The other end is the destination MAC on "tx" (egress) and the source
    MAC on "rx" (ingress); received frames for another MAC (PACKET_OTHERHOST) and the looped-back copies of
    the job's own broadcasts (PACKET_LOOPBACK) are not counted. skb->len is the whole frame, its 14-byte
    header included, at both hooks (tc pushes the header back before an ingress classifier runs). Always
    returns TC_ACT_UNSPEC: it never changes what happens to a frame."""
    if direction not in ("tx", "rx"):
        raise ValueError(f"direction {direction!r}")
    mac = 0 if direction == "tx" else 6
    p0, p1, p2 = (prefix >> 16) & 0xFF, (prefix >> 8) & 0xFF, prefix & 0xFF
    code: list[_I | str] = [_I(MOV_X, R6, R1)]
    if direction == "rx":
        code += [_I(LDX_W, R2, R6, SKB_PKT_TYPE),
                 _I(JEQ_K, R2, 0, "out", PACKET_OTHERHOST),
                 _I(JEQ_K, R2, 0, "out", PACKET_LOOPBACK)]
    code += [
        _I(LDX_W, R2, R6, SKB_DATA),
        _I(LDX_W, R3, R6, SKB_DATA_END),
        _I(MOV_X, R4, R2),
        _I(ADD_K, R4, 0, 0, 14),
        _I(JGT_X, R4, R3, "out"),             # no whole Ethernet header in the linear data: not a frame of ours
        _I(MOV_K, R7, 0, 0, base + 2),
        _I(LDX_B, R5, R2, mac),
        _I(JNE_K, R5, 0, "count", p0),
        _I(MOV_K, R7, 0, 0, base + 1),
        _I(LDX_B, R5, R2, mac + 1),
        _I(JNE_K, R5, 0, "count", p1),
        _I(LDX_B, R5, R2, mac + 2),
        _I(JNE_K, R5, 0, "count", p2),
        _I(MOV_K, R7, 0, 0, base),
        "count",
        _I(STX_W, R10, R7, -4),
        _I(MOV_X, R2, R10),
        _I(ADD_K, R2, 0, 0, -4),
        _I(LD_IMM64, R1, PSEUDO_MAP_FD, 0, map_fd), _I(0),
        _I(CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM),
        _I(JEQ_K, R0, 0, "out", 0),
        _I(LDX_W, R1, R6, SKB_LEN),
        _I(LDX_DW, R2, R0, 0),
        _I(ADD_X, R2, R1),
        _I(STX_DW, R0, R2, 0),
        _I(LDX_DW, R2, R0, 8),
        _I(ADD_K, R2, 0, 0, 1),
        _I(STX_DW, R0, R2, 8),
        "out",
        _I(MOV_K, R0, 0, 0, TC_ACT_UNSPEC),
        _I(EXIT),
    ]
    return assemble(code)


def prog_load_sched_cls(name: str, insns: bytes) -> int:
    """Load a tc classifier program; returns its fd. The verifier's log is in the error."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 16)
    attr = _attr("=IIQQIIQII", PROG_TYPE_SCHED_CLS, len(insns) // 8, _addr(code), _addr(lic), 0, 0, 0, 0, 0)
    struct.pack_into(f"={OBJ_NAME_LEN}s", attr, 48, name.encode()[:OBJ_NAME_LEN - 1])
    try:
        return _sys(PROG_LOAD, attr, f"loading the BPF program {name}")
    except BpfError as e:
        if e.errno not in (errno.EACCES, errno.EINVAL):
            raise
    # once more with the verifier's log, for the message
    struct.pack_into("=IIQ", attr, 24, 1, len(log), _addr(log))
    try:
        return _sys(PROG_LOAD, attr, f"loading the BPF program {name}")
    except BpfError as e:
        raise BpfError(e.errno or errno.EINVAL, f"loading the BPF program {name}",
                       log.value.decode(errors="replace").strip()[-800:]) from None


# ---------------------------------------------------------------------------------------------- objects by id

def prog_ids() -> list[int]:
    """Ids of every BPF program loaded on the machine."""
    out: list[int] = []
    nxt = 0
    while True:
        attr = _attr("=I", nxt)
        try:
            _sys(PROG_GET_NEXT_ID, attr, "listing BPF programs")
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return out
            raise
        nxt = struct.unpack_from("=I", attr, 4)[0]
        out.append(nxt)


def loaded_programs(names: tuple[str, ...]) -> list[ProgInfo]:
    """The loaded programs with one of these names (tests and tools: leftovers)."""
    out: list[ProgInfo] = []
    for prog_id in prog_ids():
        try:
            fd = prog_fd_by_id(prog_id)
        except BpfError:
            continue
        try:
            info = prog_info(fd)
        finally:
            os.close(fd)
        if info.name in names:
            out.append(info)
    return out


def prog_fd_by_id(prog_id: int) -> int:
    return _sys(PROG_GET_FD_BY_ID, _attr("=I", prog_id), f"opening BPF program id {prog_id}")


def map_fd_by_id(map_id: int) -> int:
    return _sys(MAP_GET_FD_BY_ID, _attr("=I", map_id), f"opening BPF map id {map_id}")


@dataclass(frozen=True)
class ProgInfo:
    id: int
    tag: bytes
    name: str
    map_ids: tuple[int, ...]


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    name: str


def prog_info(fd: int) -> ProgInfo:
    ids = (ctypes.c_uint32 * 8)()
    info = ctypes.create_string_buffer(80)
    struct.pack_into("=IQ", info, 52, len(ids), ctypes.addressof(ids))
    _sys(OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, len(info), _addr(info)), f"describing BPF program fd {fd}")
    _type, pid, tag = struct.unpack_from("=II8s", info, 0)
    nr = struct.unpack_from("=I", info, 52)[0]
    name = info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
    return ProgInfo(pid, tag, name, tuple(ids[i] for i in range(min(nr, len(ids)))))


def map_info(fd: int) -> MapInfo:
    info = ctypes.create_string_buffer(40)
    _sys(OBJ_GET_INFO_BY_FD, _attr("=IIQ", fd, len(info), _addr(info)), f"describing BPF map fd {fd}")
    raw = info.raw
    mtype, mid, ks, vs, n = struct.unpack_from("=IIIII", raw, 0)
    name = raw[24:40].split(b"\0", 1)[0].decode(errors="replace")
    return MapInfo(mid, mtype, ks, vs, n, name)


# ---------------------------------------------------------------------------------------------- tcx attachment

PROG_ATTACH = 8
PROG_DETACH = 9
PROG_QUERY = 16
TCX_INGRESS = 46
TCX_EGRESS = 47
TCX_HOOK = {"rx": TCX_INGRESS, "tx": TCX_EGRESS}
F_BEFORE = 1 << 3  # with no relative program: first on the hook
F_AFTER = 1 << 4   # last
# where our programs go: tx last (after anything that could still drop the frame), rx first (before anything
# else sees it)
TCX_POSITION = {"tx": F_AFTER, "rx": F_BEFORE}


def tcx_attach(ifindex: int, prog_fd: int, direction: str, flags: int = 0) -> None:
    """Attach the program to the device's tcx hook (ingress for "rx", egress for "tx") of the calling thread's
    network namespace, first (F_BEFORE) or last (F_AFTER) among the programs there. Such an attachment (not a
    bpf link) belongs to the device: it stays after our fd is closed and the process exits, and goes with the
    device."""
    attr = _attr("=IIII", ifindex, prog_fd, TCX_HOOK[direction], flags)
    _sys(PROG_ATTACH, attr, f"attaching a BPF program to tcx {direction} of ifindex {ifindex}")


def tcx_detach(ifindex: int, prog_fd: int, direction: str) -> None:
    attr = _attr("=IIII", ifindex, prog_fd, TCX_HOOK[direction], 0)
    _sys(PROG_DETACH, attr, f"detaching a BPF program from tcx {direction} of ifindex {ifindex}")


def tcx_query(ifindex: int, direction: str) -> list[int]:
    """Ids of the programs attached to the device's tcx hook, in the order they run ([] if none)."""
    ids = (ctypes.c_uint32 * 64)()
    attr = _attr("=IIIIQI", ifindex, TCX_HOOK[direction], 0, 0, ctypes.addressof(ids), len(ids))
    _sys(PROG_QUERY, attr, f"listing the BPF programs on tcx {direction} of ifindex {ifindex}")
    n = struct.unpack_from("=I", attr, 24)[0]
    return [ids[i] for i in range(min(n, len(ids)))]
