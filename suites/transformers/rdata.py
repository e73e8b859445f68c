"""A small reader for R's XDR serialization (the format of a package's ``data/Rdata.rdb`` / ``.rdx``).

Only what R data packages of text hold is supported: NULL, symbols, pairlists (attributes), logical /
integer / double / character vectors and lists. Anything else is an error naming the SEXP type, never a
silent guess.

    index = read_rdx("Rdata.rdx")            # {"emma": (offset, length), ...}
    lines = read_rdb_object("Rdata.rdb", *index["emma"])   # list[str | None]
"""
from __future__ import annotations

import gzip
import struct
import zlib

NILVALUE, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 254, 1, 2, 9, 10, 13, 14, 16, 19
REFSXP, GLOBALENV, EMPTYENV, BASEENV, MISSINGARG = 255, 253, 242, 241, 251
NA_INT = -(2 ** 31)


class RDataError(ValueError):
    pass


class _Reader:
    def __init__(self, buf: bytes):
        self.b, self.i, self.refs = buf, 0, []

    def int(self) -> int:
        v = struct.unpack_from(">i", self.b, self.i)[0]
        self.i += 4
        return v

    def bytes(self, n: int) -> bytes:
        v = self.b[self.i:self.i + n]
        if len(v) != n:
            raise RDataError("truncated R serialization")
        self.i += n
        return v

    def header(self) -> None:
        if self.bytes(2) != b"X\n":
            raise RDataError("not an R XDR serialization (expected 'X\\n')")
        version = self.int()
        self.int(), self.int()  # writer version, minimal reader version
        if version == 3:
            self.bytes(self.int())  # native encoding
        elif version != 2:
            raise RDataError(f"unsupported R serialization version {version}")

    def item(self):
        flags = self.int()
        t, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if t in (NILVALUE, GLOBALENV, EMPTYENV, BASEENV, MISSINGARG):
            return None
        if t == REFSXP:
            return self.refs[(flags >> 8) - 1]
        if t == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if t == LISTSXP:
            out = {}
            while True:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else None
                out[tag if tag is not None else len(out)] = self.item()
                nxt = self.int()
                if nxt & 0xFF == NILVALUE:
                    return out
                has_attr, has_tag = bool(nxt & (1 << 9)), bool(nxt & (1 << 10))
                if nxt & 0xFF != LISTSXP:
                    raise RDataError(f"pairlist continues with SEXP type {nxt & 0xFF}")
        if t == CHARSXP:
            n = self.int()
            return None if n == -1 else self.bytes(n).decode("utf-8", errors="replace")
        if t in (LGLSXP, INTSXP):
            n = self.int()
            v = [None if x == NA_INT else x for x in struct.unpack_from(f">{n}i", self.b, self.i)]
            self.i += 4 * n
        elif t == REALSXP:
            n = self.int()
            v = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
        elif t in (STRSXP, VECSXP):
            v = [self.item() for _ in range(self.int())]
        else:
            raise RDataError(f"unsupported R SEXP type {t}")
        attrs = self.item() if has_attr else None
        if attrs and "names" in attrs and t == VECSXP:
            return dict(zip(attrs["names"], v))
        return v


def unserialize(buf: bytes):
    r = _Reader(buf)
    r.header()
    return r.item()


def read_rdx(path: str) -> dict[str, tuple[int, int]]:
    """The lazy-load index: object name -> (offset, length) of its block in the .rdb file."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        buf = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else zlib.decompress(raw[4:])
    except (OSError, zlib.error) as e:
        raise RDataError(f"{path}: cannot decompress the index ({e})") from e
    idx = unserialize(buf)
    if not isinstance(idx, dict) or "variables" not in idx:
        raise RDataError(f"{path}: not an R lazy-load index")
    return {k: (int(v[0]), int(v[1])) for k, v in idx["variables"].items()}


def read_rdb_object(path: str, offset: int, length: int):
    """One block of a .rdb file: a 4-byte big-endian length, then a zlib stream of an R serialization."""
    with open(path, "rb") as f:
        f.seek(offset)
        blk = f.read(length)
    if len(blk) != length:
        raise RDataError(f"{path}: block at {offset} is truncated")
    n = struct.unpack(">I", blk[:4])[0]
    buf = zlib.decompress(blk[4:])
    if len(buf) != n:
        raise RDataError(f"{path}: block at {offset} inflates to {len(buf)} bytes, header says {n}")
    return unserialize(buf)
