"""Hand-made tars for the adapters' hostile-input tests: members of any name, links, sparse and
lying headers, built in memory (a sparse member costs a few KB, whatever size it claims)."""
from __future__ import annotations

import io
import tarfile


def tar_bytes(members, end: bool = True) -> bytes:
    """A GNU tar of ``members``: (name, bytes), ("sym" | "hard", name, target) or ("sparse", name, data, size);
    without ``end``, no end-of-archive blocks (for a member to follow)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for m in members:
            if m[0] in ("sym", "hard"):
                ti = tarfile.TarInfo(m[1])
                ti.type, ti.linkname = (tarfile.SYMTYPE if m[0] == "sym" else tarfile.LNKTYPE), m[2]
                tf.addfile(ti)
            elif m[0] == "sparse":
                buf.write(_sparse_header(m[1], m[2], m[3]))
                buf.write(m[2] + b"\0" * (-len(m[2]) % 512))
                tf.offset = buf.tell()
            else:
                ti = tarfile.TarInfo(m[0])
                ti.size = len(m[1])
                tf.addfile(ti, io.BytesIO(m[1]))
        members_end = tf.offset
    return buf.getvalue() if end else buf.getvalue()[:members_end]


def _sparse_header(name: str, data: bytes, size: int) -> bytes:
    """An old-GNU sparse header ('S'): ``data`` at offset 0, then a hole up to ``size`` bytes."""
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    header = bytearray(ti.tobuf(format=tarfile.GNU_FORMAT))
    header[156:157] = tarfile.GNUTYPE_SPARSE
    header[386:386 + 24] = tarfile.itn(0, 12, tarfile.GNU_FORMAT) + tarfile.itn(len(data), 12, tarfile.GNU_FORMAT)
    header[483:495] = tarfile.itn(size, 12, tarfile.GNU_FORMAT)  # the real size
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def header_only(name: str, size: int, body: bytes) -> bytes:
    """A member header declaring ``size`` bytes with only ``body`` after it, and no end blocks."""
    ti = tarfile.TarInfo(name)
    ti.size = size
    return ti.tobuf(format=tarfile.GNU_FORMAT) + body
