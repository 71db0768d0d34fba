// Philox4x32-10 (Salmon et al., SC'11), the counter-based generator of every specops backend.
// Definition and conventions: specops/reference/random.py.
#pragma once

#include <cstdint>

namespace specops {

constexpr int kPurposeAccept = 0;
constexpr int kPurposeDraw = 1;

struct Philox4x32Out {
  uint32_t x[4];
};

inline Philox4x32Out philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                   uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t{0xD2511F53u} * c0;
    const uint64_t p1 = uint64_t{0xCD9E8D57u} * c2;
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}

// u in [0, 1), exact in float32, for the token decided at absolute position `position`.
inline float philox_uniform(int64_t seed, int64_t position, uint32_t sibling_rank,
                            uint32_t purpose) {
  const uint64_t s = uint64_t(seed), a = uint64_t(position);
  const Philox4x32Out out = philox4x32_10(uint32_t(a), uint32_t(a >> 32), sibling_rank, purpose,
                                          uint32_t(s), uint32_t(s >> 32));
  return float(out.x[0] >> 8) * (1.0f / 16777216.0f);
}

}  // namespace specops
