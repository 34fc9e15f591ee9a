"""AES (FIPS-197) and CBC mode with PKCS#7 padding, in pure Python.

The stand-in images carry Python's standard library only, which has no block cipher; this is
what the kube-apiserver stand-in encrypts Secrets with (`aescbc`, as the real server does).
Table-driven (one round = four T-table look-ups per column); checked against the FIPS-197
and NIST SP 800-38A test vectors in tests/test_standin_encryption.py.
"""

from __future__ import annotations

__all__ = ["AES", "cbc_encrypt", "cbc_decrypt", "PaddingError"]


def _sbox() -> tuple[list[int], list[int]]:
    sbox, inv = [0] * 256, [0] * 256
    p = q = 1
    while True:  # p runs over the multiplicative group, q = p's inverse
        p = p ^ ((p << 1) & 0xFF) ^ (0x1B if p & 0x80 else 0)
        q ^= q << 1
        q ^= q << 2
        q ^= q << 4
        q &= 0xFF
        if q & 0x80:
            q ^= 0x09
        x = q ^ _rotl8(q, 1) ^ _rotl8(q, 2) ^ _rotl8(q, 3) ^ _rotl8(q, 4) ^ 0x63
        sbox[p] = x
        inv[x] = p
        if p == 1:
            break
    sbox[0] = 0x63
    inv[0x63] = 0
    return sbox, inv


def _rotl8(x: int, shift: int) -> int:
    return ((x << shift) | (x >> (8 - shift))) & 0xFF


def _xtime(x: int) -> int:
    return ((x << 1) ^ 0x1B) & 0xFF if x & 0x80 else x << 1


def _mul(a: int, b: int) -> int:
    out = 0
    while b:
        if b & 1:
            out ^= a
        a = _xtime(a)
        b >>= 1
    return out


SBOX, INV_SBOX = _sbox()


def _tables(box: list[int], coef: tuple[int, int, int, int]) -> list[list[int]]:
    """Four T-tables: the column mix of one substituted byte, rotated per row."""
    t0 = []
    for x in range(256):
        s = box[x]
        c = [_mul(s, k) for k in coef]
        t0.append((c[0] << 24) | (c[1] << 16) | (c[2] << 8) | c[3])
    out = [t0]
    for _ in range(3):
        prev = out[-1]
        out.append([((w >> 8) | (w << 24)) & 0xFFFFFFFF for w in prev])
    return out


TE = _tables(SBOX, (2, 1, 1, 3))
TD = _tables(INV_SBOX, (14, 9, 13, 11))
_RCON = (0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x1B, 0x36)


class AES:
    """One AES key (16, 24 or 32 bytes): encrypt and decrypt 16-byte blocks."""

    def __init__(self, key: bytes) -> None:
        if len(key) not in (16, 24, 32):
            raise ValueError(f"AES keys are 16, 24 or 32 bytes, not {len(key)}")
        nk = len(key) // 4
        self.rounds = nk + 6
        words = [int.from_bytes(key[4 * i:4 * i + 4], "big") for i in range(nk)]
        for i in range(nk, 4 * (self.rounds + 1)):
            t = words[i - 1]
            if i % nk == 0:
                t = ((t << 8) | (t >> 24)) & 0xFFFFFFFF
                t = _sub_word(t) ^ (_RCON[i // nk - 1] << 24)
            elif nk > 6 and i % nk == 4:
                t = _sub_word(t)
            words.append(words[i - nk] ^ t)
        self._enc = [words[4 * r:4 * r + 4] for r in range(self.rounds + 1)]
        # Decryption keys: reversed, with InvMixColumns on the middle rounds.
        dec = [self._enc[self.rounds]]
        for r in range(self.rounds - 1, 0, -1):
            dec.append([_inv_mix(w) for w in self._enc[r]])
        dec.append(self._enc[0])
        self._dec = dec

    def encrypt_block(self, block: bytes) -> bytes:
        return self._crypt(block, self._enc, TE, SBOX, (1, 2, 3))

    def decrypt_block(self, block: bytes) -> bytes:
        return self._crypt(block, self._dec, TD, INV_SBOX, (3, 2, 1))

    def _crypt(self, block: bytes, keys: list[list[int]], t: list[list[int]], box: list[int],
               shift: tuple[int, int, int]) -> bytes:
        t0, t1, t2, t3 = t
        a, b, c = shift
        k = keys[0]
        s = [int.from_bytes(block[4 * i:4 * i + 4], "big") ^ k[i] for i in range(4)]
        for r in range(1, self.rounds):
            k = keys[r]
            s = [
                t0[s[i] >> 24] ^ t1[(s[(i + a) % 4] >> 16) & 0xFF]
                ^ t2[(s[(i + b) % 4] >> 8) & 0xFF] ^ t3[s[(i + c) % 4] & 0xFF] ^ k[i]
                for i in range(4)
            ]
        k = keys[self.rounds]
        out = bytearray()
        for i in range(4):
            w = ((box[s[i] >> 24] << 24) | (box[(s[(i + a) % 4] >> 16) & 0xFF] << 16)
                 | (box[(s[(i + b) % 4] >> 8) & 0xFF] << 8) | box[s[(i + c) % 4] & 0xFF])
            out += (w ^ k[i]).to_bytes(4, "big")
        return bytes(out)


def _sub_word(w: int) -> int:
    return ((SBOX[w >> 24] << 24) | (SBOX[(w >> 16) & 0xFF] << 16)
            | (SBOX[(w >> 8) & 0xFF] << 8) | SBOX[w & 0xFF])


def _inv_mix(w: int) -> int:
    """InvMixColumns of one column word (TD of SBOX[x] undoes the S-box first)."""
    return (TD[0][SBOX[w >> 24]] ^ TD[1][SBOX[(w >> 16) & 0xFF]]
            ^ TD[2][SBOX[(w >> 8) & 0xFF]] ^ TD[3][SBOX[w & 0xFF]])


class PaddingError(ValueError):
    """Ciphertext that does not decrypt to valid PKCS#7 padding (wrong key, or damaged)."""


def _xor(x: bytes, y: bytes) -> bytes:
    return (int.from_bytes(x, "big") ^ int.from_bytes(y, "big")).to_bytes(16, "big")


def cbc_encrypt(cipher: AES, iv: bytes, plain: bytes, pad: bool = True) -> bytes:
    """CBC with PKCS#7 padding (`pad=False`: `plain` is already a whole number of blocks)."""
    if pad:
        n = 16 - len(plain) % 16
        plain = plain + bytes([n]) * n
    if len(plain) % 16 or len(iv) != 16:
        raise ValueError("CBC needs a 16-byte IV and whole blocks")
    out, prev = bytearray(), iv
    for i in range(0, len(plain), 16):
        prev = cipher.encrypt_block(_xor(plain[i:i + 16], prev))
        out += prev
    return bytes(out)


def cbc_decrypt(cipher: AES, iv: bytes, data: bytes, pad: bool = True) -> bytes:
    """The inverse of `cbc_encrypt`; PaddingError when the padding is not valid."""
    if len(data) % 16 or not data or len(iv) != 16:
        raise PaddingError("the data is not a whole number of 16-byte blocks")
    out, prev = bytearray(), iv
    for i in range(0, len(data), 16):
        block = data[i:i + 16]
        out += _xor(cipher.decrypt_block(block), prev)
        prev = block
    if not pad:
        return bytes(out)
    n = out[-1]
    if not 1 <= n <= 16 or out[-n:] != bytes([n]) * n:
        raise PaddingError("invalid PKCS#7 padding")
    return bytes(out[:-n])
