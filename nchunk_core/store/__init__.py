"""The nchunk store: one model's offloaded weights as rows on a drive, plus its resident tensors.

Layout of a store directory (format "nchunk-store", version 2):

    manifest.json               written last and atomically; describes everything below
    weights-00000.bin, ...      rows of matrix groups; every group starts at a multiple of the
                                store alignment A and every file is padded to a multiple of A
    row-crc32c.bin              CRC-32C of every stored row (uint32, little-endian)
    resident.safetensors        tensors kept in RAM (embeddings, norms, biases, vision tower, ...)
    permutations.safetensors    int64 row permutation per input name (hot-cold reordering)

The manifest may also carry `recommended`: the settings the store was validated at (recommended.py).

A group is one or more matrices that read the same input activation. Input channel i of all of them
is one contiguous row: the concatenation of W[:, i] over the group's matrices (Wᵀ layout), so
selecting channels means reading rows. q|k|v or gate|up may be one bundled group or separate groups
sharing an input name; both are valid. Each group carries crc32 checksums per 1 MiB block (checked by
`nchunk verify`) and the CRC-32C of each row (checked by the reader on every read). Version 1 had no
row checksums; `nchunk upgrade` (upgrade.py) adds them in place.

A = max(4096, the writing drive's direct-I/O offset alignment); the manifest records both.
"""
from nchunk_core.store.format import (GroupInfo, StoreCorruptError, StoreError, StoreFormatError,
                     FORMAT, VERSION)
from nchunk_core.store.loader import Store, group_rows_to_torch
from nchunk_core.store.recommended import Recommended, set_recommended
from nchunk_core.store.verify import BadBlock, VerifyReport
from nchunk_core.store.writer import StoreWriter

__all__ = ["FORMAT", "VERSION", "BadBlock", "GroupInfo", "Recommended", "Store", "StoreCorruptError",
           "StoreError", "StoreFormatError", "StoreWriter", "VerifyReport", "group_rows_to_torch",
           "set_recommended"]
