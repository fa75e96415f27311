/* plm-gguf: does each x86 instruction-set extension that ggml can use execute on this machine?
   argv[1] names one; the process exits 0 if its instructions ran, and dies with SIGILL if not.
   /proc/cpuinfo can list an extension that the OS or hypervisor does not let run. */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>

static volatile int sink;
#define T(x) __attribute__((target(x), noinline))

T("sse4.2") static void sse42(void) { sink = (int)_mm_crc32_u32((unsigned)sink, 7u); }
T("avx") static void avx(void) { __m256 a = _mm256_set1_ps((float)sink); a = _mm256_add_ps(a, a); sink = (int)_mm256_cvtss_f32(a); }
T("avx,f16c") static void f16c(void) { __m128i h = _mm_set1_epi16(0x3c00); __m256 f = _mm256_cvtph_ps(h); sink = (int)_mm256_cvtss_f32(f); }
T("avx,fma") static void fma3(void) { __m256 a = _mm256_set1_ps(1.0f + sink); a = _mm256_fmadd_ps(a, a, a); sink = (int)_mm256_cvtss_f32(a); }
T("avx2") static void avx2(void) { __m256i a = _mm256_set1_epi32(sink + 1); a = _mm256_add_epi32(a, a); sink = _mm256_extract_epi32(a, 0); }
T("bmi2") static void bmi2(void) { sink = (int)_pdep_u32((unsigned)sink + 5u, 0xf0f0u); }
T("avx512f,avx512bw,avx512vl,avx512dq,avx512cd") static void avx512(void) {
  __m512i a = _mm512_set1_epi8((char)(sink + 1)); a = _mm512_add_epi8(a, a);
  __m512 f = _mm512_set1_ps(1.0f); f = _mm512_add_ps(f, f); sink = _mm_cvtsi128_si32(_mm512_castsi512_si128(a)) + (int)_mm512_reduce_add_ps(f); }
T("avx512f,avx512vbmi") static void avx512_vbmi(void) { __m512i a = _mm512_set1_epi8(3); a = _mm512_permutexvar_epi8(a, a); sink = _mm_cvtsi128_si32(_mm512_castsi512_si128(a)); }
T("avx512f,avx512vnni") static void avx512_vnni(void) { __m512i a = _mm512_set1_epi32(sink + 1); a = _mm512_dpbusd_epi32(a, a, a); sink = _mm_cvtsi128_si32(_mm512_castsi512_si128(a)); }
T("avx512f,avx512bf16") static void avx512_bf16(void) { __m512 a = _mm512_set1_ps(1.0f); __m512bh b = _mm512_cvtne2ps_pbh(a, a); a = _mm512_dpbf16_ps(a, b, b); sink = (int)_mm512_reduce_add_ps(a); }
T("avxvnni") static void avx_vnni(void) { __m256i a = _mm256_set1_epi32(sink + 1); a = _mm256_dpbusd_avx_epi32(a, a, a); sink = _mm256_extract_epi32(a, 0); }
T("amx-tile,amx-int8") static void amx(void) {
  struct { uint8_t palette, start; uint8_t pad[14]; uint16_t colsb[16]; uint8_t rows[16]; } __attribute__((aligned(64))) cfg;
  static int8_t a[16 * 64], b[16 * 64]; static int32_t c[16 * 16];
  unsigned long perm = 0;
  syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */);
  syscall(SYS_arch_prctl, 0x1022 /* ARCH_GET_XCOMP_PERM */, &perm);
  memset(&cfg, 0, sizeof cfg); cfg.palette = 1;
  for (int i = 0; i < 3; i++) { cfg.rows[i] = 16; cfg.colsb[i] = 64; }
  memset(a, 1, sizeof a); memset(b, 2, sizeof b);
  _tile_loadconfig(&cfg); _tile_zero(0); _tile_loadd(1, a, 64); _tile_loadd(2, b, 64);
  _tile_dpbssd(0, 1, 2); _tile_stored(0, c, 64); _tile_release(); sink = c[0];
}

int main(int argc, char **argv) {
  static const struct { const char *name; void (*fn)(void); } probes[] = {
    {"SSE42", sse42}, {"AVX", avx}, {"F16C", f16c}, {"FMA", fma3}, {"AVX2", avx2}, {"BMI2", bmi2},
    {"AVX512", avx512}, {"AVX512_VBMI", avx512_vbmi}, {"AVX512_VNNI", avx512_vnni},
    {"AVX512_BF16", avx512_bf16}, {"AVX_VNNI", avx_vnni}, {"AMX_INT8", amx},
  };
  for (unsigned i = 0; i < sizeof probes / sizeof probes[0]; i++)
    if (argc > 1 && !strcmp(argv[1], probes[i].name)) { probes[i].fn(); printf("%s ok\n", argv[1]); return 0; }
  return 2;
}
