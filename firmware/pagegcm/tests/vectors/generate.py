#!/usr/bin/env python3
"""Writes page_gcm.txt: whole-page AES-256-GCM known answers for cgsvmm-page-gcm.

Generated once with an implementation independent of the crate and of its
differential references (RustCrypto aes-gcm, ring): pyca/cryptography, which
runs OpenSSL's AES-GCM. Run it again only to add vectors; the committed
file is the reference.
"""
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PAGE = 4096


def pattern(seed):
    x = (seed * 0x9E3779B97F4A7C15 | 1) & (2**64 - 1)
    out = bytearray()
    while len(out) < PAGE:
        x ^= (x << 13) & (2**64 - 1)
        x ^= x >> 7
        x ^= (x << 17) & (2**64 - 1)
        out.append(x & 0xFF)
    return bytes(out)


CASES = [
    ("zero key, nonce, aad and page", bytes(32), bytes(12), bytes(32), bytes(PAGE)),
    ("all-ones everything", b"\xff" * 32, b"\xff" * 12, b"\xff" * 32, b"\xff" * PAGE),
    (
        "counting key and nonce, patterned page",
        bytes(range(32)),
        bytes(range(0xA0, 0xAC)),
        bytes(range(0x40, 0x60)),
        pattern(7),
    ),
    (
        "patterned everything",
        pattern(1)[:32],
        pattern(2)[:12],
        pattern(3)[:32],
        pattern(4),
    ),
]

with open("page_gcm.txt", "w") as f:
    f.write("# AES-256-GCM over one 4 KiB page with 32 bytes of AAD (pyca/cryptography, OpenSSL).\n")
    f.write("# One block per case: name, key, nonce, aad, plaintext, ciphertext, tag (hex).\n")
    for name, key, nonce, aad, page in CASES:
        sealed = AESGCM(key).encrypt(nonce, page, aad)
        ct, tag = sealed[:-16], sealed[-16:]
        f.write(f"\nname = {name}\n")
        for label, value in [("key", key), ("nonce", nonce), ("aad", aad), ("plaintext", page), ("ciphertext", ct), ("tag", tag)]:
            f.write(f"{label} = {value.hex()}\n")
