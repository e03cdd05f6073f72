// CRC-32C (Castagnoli polynomial, the iSCSI/ext4 checksum) of byte ranges and of rows.
//
// The CPU's CRC instruction is used where present, chosen at run time so that one build runs on any
// CPU of its architecture: SSE4.2 `crc32` on x86-64 (cpuid), the ARMv8 CRC32 extension on aarch64
// (AT_HWCAP). Elsewhere, or when asked, a portable slicing-by-8 table computes the same values.
// Standard parameters: initial value and final XOR 0xFFFFFFFF, reflected; CRC-32C("123456789") is
// 0xE3069283. This core knows nothing of Python.
#pragma once

#include <cstddef>
#include <cstdint>

namespace nchunk {

enum class Crc32cPath {
  automatic,  // the CPU's instruction where present, else the table
  table,      // the portable table, always
  hardware,   // the CPU's instruction; std::invalid_argument where there is none
};

// The instruction the automatic path uses on this CPU: "sse4.2", "armv8-crc", or "" (table only).
const char* crc32c_hardware();

// CRC-32C of `n` bytes at `data`, continuing from `crc` (0 to start): crc32c(crc32c(0, a), b) equals
// the CRC-32C of a followed by b.
uint32_t crc32c(uint32_t crc, const void* data, size_t n, Crc32cPath path = Crc32cPath::automatic);

// CRC-32C of each of `rows` consecutive rows of `row_bytes` bytes at `data`, into out[0..rows).
// With the instruction, three rows are computed at once (their dependency chains interleave).
void crc32c_rows(const void* data, size_t row_bytes, size_t rows, uint32_t* out,
                 Crc32cPath path = Crc32cPath::automatic);

}  // namespace nchunk
