// Host-execution harness of the CUDA kernels: a test-only program that runs the entry points of
// csrc/cuda_kernels.cu -- compiled as plain C++ with host/cuda_host_shim.h, usually under
// AddressSanitizer and UndefinedBehaviorSanitizer -- on cases read from a file, and writes
// what they produced to another file. python_tests/core/test_cuda_host.py builds it, writes
// the cases, and checks the results bit for bit against the noise contract.
//
//   cuda_host INPUT OUTPUT        run the cases of INPUT, write OUTPUT
//   cuda_host --selftest-asan     read one element past a buffer (must be reported)
//   cuda_host --selftest-ubsan    load a float4 from a misaligned address (must be reported)
//
// Files are sequences of little-endian 64-bit words ("w" below); a float travels as its bit
// pattern in the low 32 bits of a word; a blob is a word with its byte count followed by the
// bytes, zero-padded to a multiple of 8.
//
// INPUT:  w magic "ZOFOHX03", w number of cases, then per case
//           w op (0 noise, 1 perturb, 2 update, 3 magnitude_mask), w sms, w order_seed,
//           w device, w seed, w distribution,
//           noise:    w start, w numel, w direction
//           perturb:  w dtype, w restore_scale, w restore_direction, w scale, w direction, ROWS
//           update:   w dtype, w restore_scale, w restore_direction, w lr, w weight_decay,
//                     w stochastic_rounding, w q, q x w projected gradient, ROWS
//           magnitude_mask: w dtype, w num_rows, w total_words, num_rows x (w numel,
//                     w first_word, w align, w threshold), then num_rows x blob (the tensor)
//         ROWS: w num_rows, w total_groups, w masked (1/0), w rank (0: no factors),
//               num_rows x (w numel, w offset, w first_group, w align), then num_rows x
//               blob (the tensor's numel elements), then, if masked, num_rows x blob (the
//               tensor's bitmap, ceil(numel / 32) uint32 words; a row with no element gets a
//               null bitmap pointer), then, if rank > 0, num_rows x (w directions D, w rows
//               m, w cols n, blob U (D*m*rank float32), blob V (D*n*rank float32)); D = 0:
//               the row has no factors (null pointers, m = n = 0 in its table row)
//         align >= 0: the tensor starts `align` elements after a 64-byte boundary (the
//         elements before it are a canary), and ends where its allocation ends, so that
//         AddressSanitizer sees any access past it; align = -1: null pointer (numel 0).
// OUTPUT: per case: w rc, blob error message, w number of launches, launches x (w blocks,
//         w threads), w canaries intact (1/0), then noise: blob of numel float32; perturb,
//         update: num_rows x blob (the tensors after the call); magnitude_mask: num_rows x
//         blob (the bitmaps, which start as 0xA5 bytes so that a word never written shows).
//
// Every buffer the kernels see -- tensors, bitmaps, low-rank factors, the row table, the
// projected gradients, the noise output -- is its own heap allocation of exactly the size the
// GPU code may touch, the way device memory of that size would be.

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <string>
#include <vector>

#include "cuda_api.h"
#include "host/cuda_host_shim.h"

namespace {

constexpr uint64_t kMagic = 0x333058484F464F5Aull;  // "ZOFOHX03"
constexpr unsigned char kCanary = 0xA5;

[[noreturn]] void die(const char* what) {
  fprintf(stderr, "cuda_host: %s\n", what);
  exit(2);
}

struct Reader {
  FILE* f;
  int64_t w() {
    int64_t v;
    if (fread(&v, 8, 1, f) != 1) die("input ended early");
    return v;
  }
  float f32() {
    const uint32_t u = (uint32_t)w();
    float x;
    memcpy(&x, &u, 4);
    return x;
  }
  void blob(void* dst, size_t expected) {
    const int64_t n = w();
    if (n != (int64_t)expected) die("blob of unexpected size");
    if (n && fread(dst, 1, (size_t)n, f) != (size_t)n) die("input ended early");
    char pad[8];
    const size_t padn = (size_t)((8 - n % 8) % 8);
    if (padn && fread(pad, 1, padn, f) != padn) die("input ended early");
  }
};

struct Writer {
  FILE* f;
  void w(int64_t v) { fwrite(&v, 8, 1, f); }
  void blob(const void* src, size_t n) {
    w((int64_t)n);
    if (n) fwrite(src, 1, n, f);
    const char pad[8] = {0};
    fwrite(pad, 1, (8 - n % 8) % 8, f);
  }
};

// A tensor as the device would hold it: `align` canary elements, then exactly numel elements.
struct Buffer {
  void* base = nullptr;
  size_t lead = 0;   // canary bytes
  size_t bytes = 0;  // tensor bytes
  char* data() const { return base ? (char*)base + lead : nullptr; }
};

Buffer make_buffer(int64_t numel, int64_t align, size_t esize) {
  Buffer b;
  if (align < 0) {
    if (numel != 0) die("a null tensor must be empty");
    return b;
  }
  b.lead = (size_t)align * esize;
  b.bytes = (size_t)numel * esize;
  if (posix_memalign(&b.base, 64, b.lead + b.bytes)) die("out of memory");
  memset(b.base, kCanary, b.lead);
  return b;
}

bool canary_intact(const Buffer& b) {
  for (size_t i = 0; i < b.lead; ++i)
    if (((const unsigned char*)b.base)[i] != kCanary) return false;
  return true;
}

// A bitmap of ceil(numel / 32) words in an allocation of exactly that size (null when
// empty), filled with `fill` bytes.
uint32_t* make_bitmap(int64_t numel, int fill) {
  const size_t bytes = (size_t)((numel + 31) / 32) * 4;
  if (bytes == 0) return nullptr;
  uint32_t* m = (uint32_t*)malloc(bytes);
  if (!m) die("out of memory");
  memset(m, fill, bytes);
  return m;
}

size_t elem_size(int dtype) { return dtype == 0 ? 4 : 2; }

// A float32 array of exactly n values (null when n is 0), read from a blob of the input.
float* read_floats(Reader& in, int64_t n) {
  float* p = nullptr;
  if (n > 0) {
    p = (float*)malloc((size_t)n * 4);
    if (!p) die("out of memory");
  }
  in.blob(p, (size_t)(n > 0 ? n : 0) * 4);
  return p;
}

// What a case leaves behind: the tensors (and bitmaps, factors) it allocated, the noise output.
struct CaseState {
  std::vector<Buffer> buffers;
  std::vector<uint32_t*> bitmaps;
  std::vector<float*> factors;
  std::vector<int64_t> numels;
  std::vector<char> noise_out;
};

// ROWS of a perturb or update case: the device table (exactly num_rows rows), the tensors
// and, if the case is masked, their bitmaps, if it has a rank, their factors.
ZofoSegmentRow* read_rows(Reader& in, int dtype, CaseState& cs, int64_t* num_rows,
                          int64_t* total_groups, int* rank) {
  *num_rows = in.w();
  *total_groups = in.w();
  const bool masked = in.w() != 0;
  *rank = (int)in.w();
  const int64_t n = *num_rows;
  ZofoSegmentRow* rows = (ZofoSegmentRow*)malloc((size_t)(n > 0 ? n : 0) *
                                                 sizeof(ZofoSegmentRow));
  for (int64_t r = 0; r < n; ++r) {
    cs.numels.push_back(in.w());
    rows[r].numel = cs.numels[r];
    rows[r].offset = in.w();
    rows[r].first_group = in.w();
    cs.buffers.push_back(make_buffer(cs.numels[r], in.w(), elem_size(dtype)));
    rows[r].ptr = (int64_t)(uintptr_t)cs.buffers.back().data();
    rows[r].mask = 0;
    rows[r].u = rows[r].v = rows[r].rows = rows[r].cols = 0;
  }
  for (int64_t r = 0; r < n; ++r) in.blob(cs.buffers[r].data(), cs.buffers[r].bytes);
  if (masked) {
    for (int64_t r = 0; r < n; ++r) {
      uint32_t* m = make_bitmap(cs.numels[r], 0);
      in.blob(m, (size_t)((cs.numels[r] + 31) / 32) * 4);
      rows[r].mask = (int64_t)(uintptr_t)m;
      cs.bitmaps.push_back(m);
    }
  }
  if (*rank > 0) {
    for (int64_t r = 0; r < n; ++r) {
      const int64_t d = in.w(), m = in.w(), c = in.w();
      float* u = read_floats(in, d * m * *rank);
      float* v = read_floats(in, d * c * *rank);
      cs.factors.push_back(u);
      cs.factors.push_back(v);
      if (d > 0) {
        rows[r].u = (int64_t)(uintptr_t)u;
        rows[r].v = (int64_t)(uintptr_t)v;
        rows[r].rows = m;
        rows[r].cols = c;
      }
    }
  }
  return rows;
}

int run_noise(Reader& in, uint64_t seed, int dist, int device, CaseState& cs, char* err,
              size_t errlen) {
  const int64_t start = in.w(), numel = in.w();
  const uint32_t dir = (uint32_t)in.w();
  float* z = nullptr;
  if (numel > 0) {
    z = (float*)malloc((size_t)numel * 4);
    if (!z) die("out of memory");
    memset(z, 0xFF, (size_t)numel * 4);  // NaN: an element never written shows
  }
  const int rc = zofo_cuda_noise(z, seed, start, numel, dist, dir, device, nullptr, err, errlen);
  if (numel > 0) {
    cs.noise_out.assign((char*)z, (char*)z + numel * 4);
    free(z);
  }
  return rc;
}

int run_perturb_or_update(Reader& in, int64_t op, uint64_t seed, int dist, int device,
                          CaseState& cs, char* err, size_t errlen) {
  const int dtype = (int)in.w();
  const float rscale = in.f32();
  const uint32_t rdir = (uint32_t)in.w();
  float scale = 0.0f, lr = 0.0f, wd = 0.0f;
  uint32_t dir = 0;
  int sr = 0;
  int64_t q = 0;
  float* grads = nullptr;
  if (op == 1) {
    scale = in.f32();
    dir = (uint32_t)in.w();
  } else {
    lr = in.f32();
    wd = in.f32();
    sr = (int)in.w();
    q = in.w();
    if (q < 1) die("update needs q >= 1");
    grads = (float*)malloc((size_t)q * 4);  // "device memory" holding exactly q values
    if (!grads) die("out of memory");
    for (int64_t k = 0; k < q; ++k) grads[k] = in.f32();
  }
  int64_t num_rows, total_groups;
  int rank;
  ZofoSegmentRow* rows = read_rows(in, dtype, cs, &num_rows, &total_groups, &rank);
  int rc;
  if (op == 1) {
    rc = zofo_cuda_perturb(rows, num_rows, total_groups, dtype, seed, dist, scale, dir, rscale,
                           rdir, rank, device, nullptr, err, errlen);
  } else {
    rc = zofo_cuda_update(rows, num_rows, total_groups, dtype, seed, dist, lr, grads, q,
                          rscale, rdir, wd, sr, rank, device, nullptr, err, errlen);
  }
  free(rows);
  free(grads);
  return rc;
}

int run_magnitude(Reader& in, int device, CaseState& cs, char* err, size_t errlen) {
  const int dtype = (int)in.w();
  const int64_t num_rows = in.w(), total_words = in.w();
  ZofoMaskRow* rows = (ZofoMaskRow*)malloc((size_t)(num_rows > 0 ? num_rows : 0) *
                                           sizeof(ZofoMaskRow));
  for (int64_t r = 0; r < num_rows; ++r) {
    cs.numels.push_back(in.w());
    rows[r].numel = cs.numels[r];
    rows[r].first_word = in.w();
    cs.buffers.push_back(make_buffer(cs.numels[r], in.w(), elem_size(dtype)));
    rows[r].ptr = (int64_t)(uintptr_t)cs.buffers.back().data();
    rows[r].threshold_bits = (int64_t)(uint32_t)in.w();
    cs.bitmaps.push_back(make_bitmap(cs.numels[r], 0xA5));
    rows[r].words = (int64_t)(uintptr_t)cs.bitmaps.back();
  }
  for (int64_t r = 0; r < num_rows; ++r) in.blob(cs.buffers[r].data(), cs.buffers[r].bytes);
  const int rc = zofo_cuda_magnitude_mask(rows, num_rows, total_words, dtype, device, nullptr,
                                          err, errlen);
  free(rows);
  return rc;
}

void run_case(Reader& in, Writer& out) {
  const int64_t op = in.w();
  zofo_host::State& st = zofo_host::state();
  st.sms = (int)in.w();
  st.order_seed = (uint64_t)in.w();
  st.launches.clear();
  const int device = (int)in.w();
  const uint64_t seed = (uint64_t)in.w();
  const int dist = (int)in.w();
  char err[512] = {0};
  CaseState cs;
  int rc = 0;
  if (op == 0) {
    rc = run_noise(in, seed, dist, device, cs, err, sizeof(err));
  } else if (op == 1 || op == 2) {
    rc = run_perturb_or_update(in, op, seed, dist, device, cs, err, sizeof(err));
  } else if (op == 3) {
    rc = run_magnitude(in, device, cs, err, sizeof(err));
  } else {
    die("unknown op");
  }

  out.w(rc);
  out.blob(err, rc ? strlen(err) : 0);
  out.w((int64_t)st.launches.size());
  for (const zofo_host::Launch& l : st.launches) {
    out.w(l.blocks);
    out.w(l.threads);
  }
  bool canaries = true;
  for (const Buffer& b : cs.buffers) canaries = canaries && canary_intact(b);
  out.w(canaries ? 1 : 0);
  if (op == 0) {
    out.blob(cs.noise_out.data(), cs.noise_out.size());
  } else if (op == 3) {
    for (size_t r = 0; r < cs.bitmaps.size(); ++r)
      out.blob(cs.bitmaps[r], (size_t)((cs.numels[r] + 31) / 32) * 4);
  } else {
    for (const Buffer& b : cs.buffers) out.blob(b.data(), b.bytes);
  }
  for (const Buffer& b : cs.buffers) free(b.base);
  for (uint32_t* m : cs.bitmaps) free(m);
  for (float* f : cs.factors) free(f);
}

// Proof that the sanitizers are compiled in: each must abort the program.
int selftest(const char* which) {
  if (strcmp(which, "--selftest-asan") == 0) {
    volatile size_t n = 3;  // sizes unknown to the compiler: only AddressSanitizer can tell
    float* p = (float*)calloc(n, sizeof(float));
    const float x = p[n];   // one past the end
    free(p);
    return x == 12345.0f ? 3 : 0;
  }
  if (strcmp(which, "--selftest-ubsan") == 0) {
    float* base = nullptr;
    if (posix_memalign((void**)&base, 64, 8 * sizeof(float))) die("out of memory");
    for (int i = 0; i < 8; ++i) base[i] = (float)i;
    float4 v = *reinterpret_cast<const float4*>(base + 1);  // 4 bytes past a 16-byte boundary
    free(base);
    return v.x == 12345.0f ? 3 : 0;
  }
  die("unknown self-test");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && strncmp(argv[1], "--selftest-", 11) == 0) return selftest(argv[1]);
  if (argc != 3) {
    fprintf(stderr, "usage: cuda_host INPUT OUTPUT | --selftest-asan | --selftest-ubsan\n");
    return 2;
  }
  FILE* fi = fopen(argv[1], "rb");
  if (!fi) die("cannot open the input");
  FILE* fo = fopen(argv[2], "wb");
  if (!fo) die("cannot open the output");
  Reader in{fi};
  Writer out{fo};
  if ((uint64_t)in.w() != kMagic) die("bad magic");
  const int64_t cases = in.w();
  for (int64_t c = 0; c < cases; ++c) {
    run_case(in, out);
    fflush(fo);  // a sanitizer abort in a later case leaves the earlier results readable
  }
  if (fclose(fo) != 0) die("cannot write the output");
  fclose(fi);
  return 0;
}
