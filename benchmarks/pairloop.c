/* The original recorder's counting loop, re-implemented faithfully for comparison (not used by mpicorr).
 *
 * For every token, +1 (atomic) on C[a, b] for each pair b <= a of its active neurons, in a packed
 * lower triangle of uint32; tokens are split over OpenMP threads as llama.cpp split them.
 *
 *   cc -O3 -march=native -fopenmp pairloop.c -o pairloop
 *   ./pairloop ACTIVE_FILE N REPEATS    -> "seconds checksum" (best of REPEATS)
 *
 * ACTIVE_FILE: int64 tokens, then tokens+1 int64 row offsets, then the int64 active neuron indices
 * (ascending within each token), all little-endian: the CSR that benchmarks/compare.py writes.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

static int64_t *read_all(const char *path, int64_t *count) {
    FILE *f = fopen(path, "rb");
    if (!f) { perror(path); exit(2); }
    fseek(f, 0, SEEK_END);
    long bytes = ftell(f);
    fseek(f, 0, SEEK_SET);
    int64_t *data = malloc(bytes);
    if (fread(data, 1, bytes, f) != (size_t)bytes) { perror(path); exit(2); }
    fclose(f);
    *count = bytes / 8;
    return data;
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: pairloop ACTIVE_FILE N REPEATS\n"); return 2; }
    int64_t words, n = atoll(argv[2]);
    int repeats = atoi(argv[3]);
    int64_t *data = read_all(argv[1], &words);
    int64_t tokens = data[0], *indptr = data + 1, *indices = data + 2 + tokens;
    size_t packed = (size_t)n * (n + 1) / 2;
    uint32_t *counts = malloc(packed * sizeof(uint32_t));
    double best = 1e30;
    for (int r = 0; r < repeats; r++) {
        memset(counts, 0, packed * sizeof(uint32_t));  /* also touches every page before the timing */
        double t0 = omp_get_wtime();
        #pragma omp parallel for schedule(dynamic, 8)
        for (int64_t t = 0; t < tokens; t++) {
            for (int64_t x = indptr[t]; x < indptr[t + 1]; x++) {
                int64_t a = indices[x];
                uint32_t *row = counts + (size_t)a * (a + 1) / 2;
                for (int64_t y = indptr[t]; y <= x; y++)
                    __atomic_fetch_add(&row[indices[y]], 1u, __ATOMIC_RELAXED);
            }
        }
        double dt = omp_get_wtime() - t0;
        if (dt < best) best = dt;
    }
    uint64_t checksum = 0;
    for (size_t i = 0; i < packed; i++) checksum += counts[i] * (uint64_t)(i % 1000003 + 1);
    printf("%.6f %llu\n", best, (unsigned long long)checksum);
    return 0;
}
