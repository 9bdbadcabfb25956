"""LZF decompression: the codec of PCD's ``DATA binary_compressed``, in pure Python."""

from __future__ import annotations


def lzf_decompress(src: bytes, out_size: int) -> bytes:
    """Decompress LZF (the codec of PCD's binary_compressed) into exactly ``out_size`` bytes."""
    out = bytearray(out_size)
    i = o = 0
    n = len(src)
    while i < n:
        ctrl = src[i]
        i += 1
        if ctrl < 32:  # literal run of ctrl + 1 bytes
            run = ctrl + 1
            if i + run > n or o + run > out_size:
                raise ValueError("corrupt LZF data (literal run overflows)")
            out[o : o + run] = src[i : i + run]
            i += run
            o += run
        else:  # back reference: length in the top 3 bits (7 = extended), 13-bit offset
            length = ctrl >> 5
            if i + (length == 7) >= n:
                raise ValueError("corrupt LZF data (truncated back reference)")
            if length == 7:
                length += src[i]
                i += 1
            ref = o - ((ctrl & 0x1F) << 8) - src[i] - 1
            i += 1
            length += 2
            if ref < 0 or o + length > out_size:
                raise ValueError("corrupt LZF data (back reference out of range)")
            # Byte by byte when the ranges overlap (a repeated pattern), else one slice.
            if ref + length <= o:
                out[o : o + length] = out[ref : ref + length]
            else:
                for k in range(length):
                    out[o + k] = out[ref + k]
            o += length
    if o != out_size:
        raise ValueError(f"corrupt LZF data ({o} bytes decoded, {out_size} expected)")
    return bytes(out)
