// CRC-32C declared in crc32c.hpp: the portable table, the x86-64 SSE4.2 and aarch64 CRC32 paths, and
// the run-time choice between them. No machine flag is needed to build this file: the functions that
// use an instruction carry a target attribute and run only after the CPU said it has it.
#include "crc32c.hpp"

#include <cstring>
#include <stdexcept>

#if defined(__x86_64__)
#include <nmmintrin.h>
#define NCHUNK_CRC_HARDWARE "sse4.2"
#define NCHUNK_TARGET_CRC __attribute__((target("sse4.2")))
#elif defined(__aarch64__)
#include <arm_acle.h>
#include <sys/auxv.h>
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)  // arch/arm64/include/uapi/asm/hwcap.h
#endif
#define NCHUNK_CRC_HARDWARE "armv8-crc"
#if defined(__clang__)
#define NCHUNK_TARGET_CRC __attribute__((target("crc")))
#else
#define NCHUNK_TARGET_CRC __attribute__((target("+crc")))
#endif
#endif

namespace nchunk {
namespace {

constexpr uint32_t kPolynomial = 0x82F63B78U;  // Castagnoli, bit-reversed

uint64_t load64(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// ---- portable path: slicing by 8 ----

struct Tables {
  uint32_t t[8][256];
  Tables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kPolynomial : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i) {
      for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
    }
  }
};

const Tables& tables() {
  static const Tables instance;
  return instance;
}

// Updates the raw (pre-inverted) register `crc` with n bytes.
uint32_t table_update(uint32_t crc, const unsigned char* p, size_t n) {
  const auto& t = tables().t;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  for (; n >= 8; p += 8, n -= 8) {
    const uint64_t v = load64(p) ^ crc;
    crc = t[7][v & 0xFF] ^ t[6][(v >> 8) & 0xFF] ^ t[5][(v >> 16) & 0xFF] ^ t[4][(v >> 24) & 0xFF] ^
          t[3][(v >> 32) & 0xFF] ^ t[2][(v >> 40) & 0xFF] ^ t[1][(v >> 48) & 0xFF] ^ t[0][v >> 56];
  }
#endif
  for (; n > 0; ++p, --n) crc = (crc >> 8) ^ t[0][(crc ^ *p) & 0xFF];
  return crc;
}

// ---- hardware path ----

#ifdef NCHUNK_CRC_HARDWARE
#if defined(__x86_64__)
NCHUNK_TARGET_CRC inline uint32_t step64(uint32_t crc, uint64_t v) {
  return static_cast<uint32_t>(_mm_crc32_u64(crc, v));
}
NCHUNK_TARGET_CRC inline uint32_t step8(uint32_t crc, unsigned char v) { return _mm_crc32_u8(crc, v); }
bool cpu_has_crc() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("sse4.2");
}
#else
NCHUNK_TARGET_CRC inline uint32_t step64(uint32_t crc, uint64_t v) { return __crc32cd(crc, v); }
NCHUNK_TARGET_CRC inline uint32_t step8(uint32_t crc, unsigned char v) { return __crc32cb(crc, v); }
bool cpu_has_crc() { return (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0; }
#endif

NCHUNK_TARGET_CRC uint32_t hardware_update(uint32_t crc, const unsigned char* p, size_t n) {
  for (; n >= 8; p += 8, n -= 8) crc = step64(crc, load64(p));
  for (; n > 0; ++p, --n) crc = step8(crc, *p);
  return crc;
}

// Three rows at once: the instruction's latency is about three times its issue interval, so three
// independent chains keep it busy where one chain would wait on itself.
NCHUNK_TARGET_CRC void hardware_rows3(const unsigned char* a, size_t row_bytes, uint32_t* out) {
  const unsigned char* b = a + row_bytes;
  const unsigned char* c = b + row_bytes;
  uint32_t ca = 0xFFFFFFFFU, cb = 0xFFFFFFFFU, cc = 0xFFFFFFFFU;
  size_t i = 0;
  for (; i + 8 <= row_bytes; i += 8) {
    ca = step64(ca, load64(a + i));
    cb = step64(cb, load64(b + i));
    cc = step64(cc, load64(c + i));
  }
  for (; i < row_bytes; ++i) {
    ca = step8(ca, a[i]);
    cb = step8(cb, b[i]);
    cc = step8(cc, c[i]);
  }
  out[0] = ~ca;
  out[1] = ~cb;
  out[2] = ~cc;
}

bool hardware_present() {
  static const bool present = cpu_has_crc();
  return present;
}
#else
bool hardware_present() { return false; }
#endif

// True when `path` resolves to the instruction; throws when the instruction is demanded but absent.
bool use_hardware(Crc32cPath path) {
  if (path == Crc32cPath::table) return false;
  if (hardware_present()) return true;
  if (path == Crc32cPath::hardware) {
    throw std::invalid_argument("this CPU has no CRC-32C instruction (SSE4.2 on x86-64, CRC32 on aarch64)");
  }
  return false;
}

}  // namespace

const char* crc32c_hardware() {
#ifdef NCHUNK_CRC_HARDWARE
  if (hardware_present()) return NCHUNK_CRC_HARDWARE;
#endif
  return "";
}

uint32_t crc32c(uint32_t crc, const void* data, size_t n, Crc32cPath path) {
  const auto* p = static_cast<const unsigned char*>(data);
#ifdef NCHUNK_CRC_HARDWARE
  if (use_hardware(path)) return ~hardware_update(~crc, p, n);
#else
  use_hardware(path);
#endif
  return ~table_update(~crc, p, n);
}

void crc32c_rows(const void* data, size_t row_bytes, size_t rows, uint32_t* out, Crc32cPath path) {
  const auto* p = static_cast<const unsigned char*>(data);
  size_t r = 0;
#ifdef NCHUNK_CRC_HARDWARE
  if (use_hardware(path)) {
    for (; r + 3 <= rows; r += 3) hardware_rows3(p + r * row_bytes, row_bytes, out + r);
    for (; r < rows; ++r) out[r] = ~hardware_update(0xFFFFFFFFU, p + r * row_bytes, row_bytes);
    return;
  }
#else
  use_hardware(path);
#endif
  for (; r < rows; ++r) out[r] = ~table_update(0xFFFFFFFFU, p + r * row_bytes, row_bytes);
}

}  // namespace nchunk
