/* Fused CPU fake-quantization kernels of ts_qat_pytorch (fake_quantize/cpu_kernels.py builds this file with
 * the system C compiler and calls it through ctypes).
 *
 * Semantics follow torch's CPU kernels exactly (quantized/cpu/kernels/QuantizedOpKernels.cpp):
 *   forward   q = z + rint(x * (1/s)), y = (clamp(q, qmin, qmax) - z) * s          (float arithmetic)
 *   backward  q = rint(z + x * (1/s)); dx = dy * [qmin <= q <= qmax];
 *             ds += dy * ((clamp(q) - z) * s - x) * (1/s) inside, dy * (qmin - z | qmax - z) outside;
 *             dz += -dy * s outside.
 */
#include <math.h>
#include <stdint.h>
#include <omp.h>

#define MAXT 1024
#define PAR_MIN 32768
#define BLK 4096

/* clamp(q, qmin, qmax) with NaN -> qmin (torch casts NaN to the lowest integer); selects, so it vectorises. */
static inline float clampq(float q, float qmin, float qmax) {
    q = (q >= qmin) ? q : qmin;
    return (q <= qmax) ? q : qmax;
}

/* One block of the learnable backward: dx, and float sums of the scale / outside-gradient terms, vectorised
   (omp simd lets the sums be reordered in a fixed way); blocks are added in float64 by the callers. */
static inline void learn_block(const float* x, const float* g, float* dx, int64_t n, float sc, float zp, float inv,
                               float qmin, float qmax, float* s_out, float* z_out) {
    const float dsmall = qmin - zp, dbig = qmax - zp;
    float fs = 0.0f, fz = 0.0f;
    #pragma omp simd reduction(+:fs, fz)
    for (int64_t i = 0; i < n; i++) {
        float xi = x[i], gi = g[i];
        float q = rintf(zp + xi * inv);
        int inside = (q >= qmin && q <= qmax);
        float tin = ((q - zp) * sc - xi) * inv;
        float tout = (q < qmin) ? dsmall : dbig;
        dx[i] = gi * (inside ? 1.0f : 0.0f);
        fs += gi * (inside ? tin : tout);
        fz += inside ? 0.0f : gi;
    }
    *s_out = fs;
    *z_out = fz;
}

/* Rows of `inner` contiguous elements; row r belongs to channel (r % C). Per tensor: C = 1. */

void tsq_forward(const float* x, float* y, int64_t outer, int64_t C, int64_t inner,
                 const float* s, const float* z, float qmin, float qmax, int nt) {
    int64_t rows = outer * C;
    int64_t n = rows * inner;
    #pragma omp parallel for num_threads(nt) schedule(static) if(n >= PAR_MIN)
    for (int64_t r = 0; r < rows; r++) {
        int64_t c = r % C;
        const float sc = s[c], zp = z[c], inv = 1.0f / sc;
        const float* xr = x + r * inner;
        float* yr = y + r * inner;
        #pragma omp simd
        for (int64_t k = 0; k < inner; k++) {
            yr[k] = (clampq(zp + rintf(xr[k] * inv), qmin, qmax) - zp) * sc;
        }
    }
}

/* Flat per-tensor forward over any dense layout (channels_last included). */
void tsq_forward_flat(const float* x, float* y, int64_t n, float sc, float zp, float qmin, float qmax, int nt) {
    const float inv = 1.0f / sc;
    #pragma omp parallel for simd num_threads(nt) schedule(static) if(n >= PAR_MIN)
    for (int64_t i = 0; i < n; i++) {
        y[i] = (clampq(zp + rintf(x[i] * inv), qmin, qmax) - zp) * sc;
    }
}

/* Fixed quantizer: dx = dy inside the range, 0 outside (the straight-through estimator), with the range test
   of torch's forward (its cached mask). */
void tsq_backward_input(const float* x, const float* g, float* dx, int64_t n, float sc, float zp,
                        float qmin, float qmax, int nt) {
    const float inv = 1.0f / sc;
    #pragma omp parallel for simd num_threads(nt) schedule(static) if(n >= PAR_MIN)
    for (int64_t i = 0; i < n; i++) {
        float q = zp + rintf(x[i] * inv);
        dx[i] = g[i] * ((q >= qmin && q <= qmax) ? 1.0f : 0.0f);
    }
}

/* Per tensor, learnable: dx, and the scale / zero-point gradient sums, in one pass (flat, any layout). */
void tsq_backward_learnable_flat(const float* x, const float* g, float* dx, int64_t n, float sc, float zp,
                                 float qmin, float qmax, int nt, double* ds_out, double* dz_out) {
    const float inv = 1.0f / sc;
    double ds_part[MAXT], dz_part[MAXT];
    int used = 1;
    #pragma omp parallel num_threads(nt) if(n >= PAR_MIN)
    {
        int t = omp_get_thread_num(), T = omp_get_num_threads();
        #pragma omp single
        used = T;
        int64_t lo = n * t / T, hi = n * (t + 1) / T;
        double ds = 0.0, dz = 0.0;
        for (int64_t b = lo; b < hi; b += BLK) {
            int64_t m = (hi - b < BLK) ? hi - b : BLK;
            float fs, fz;
            learn_block(x + b, g + b, dx + b, m, sc, zp, inv, qmin, qmax, &fs, &fz);
            ds += fs;
            dz += fz;
        }
        ds_part[t] = ds;
        dz_part[t] = dz;
    }
    double ds = 0.0, dz = 0.0;
    for (int t = 0; t < used; t++) { ds += ds_part[t]; dz += dz_part[t]; }
    *ds_out = ds;
    *dz_out = -dz * sc;
}

/* Per channel (rows of `inner` elements, channel r % C), learnable: each thread owns whole channels. */
void tsq_backward_learnable_rows(const float* x, const float* g, float* dx, int64_t outer, int64_t C,
                                 int64_t inner, const float* s, const float* z, float qmin, float qmax,
                                 int nt, double gf, float* ds_out, float* dz_out) {
    int64_t n = outer * C * inner;
    #pragma omp parallel for num_threads(nt) schedule(static) if(n >= PAR_MIN)
    for (int64_t c = 0; c < C; c++) {
        const float sc = s[c], zp = z[c], inv = 1.0f / sc;
        double ds = 0.0, dz = 0.0;
        for (int64_t o = 0; o < outer; o++) {
            int64_t base = (o * C + c) * inner;
            for (int64_t b = 0; b < inner; b += BLK) {
                int64_t m = (inner - b < BLK) ? inner - b : BLK;
                float fs, fz;
                learn_block(x + base + b, g + base + b, dx + base + b, m, sc, zp, inv, qmin, qmax, &fs, &fz);
                ds += fs;
                dz += fz;
            }
        }
        ds_out[c] = (float)(ds * gf);
        dz_out[c] = (float)(-dz * sc * gf);
    }
}

/* Backward of a per-channel rescale in the BN-folding QAT layers, in one pass over g and t:
     divide = 1: out = y / s[c]  (the output rescale)   gy = g / s[c], ds[c] = -sum(g * out) / s[c], t = out
     divide = 0: out = w * s[c]  (the weight fold)      gy = g * s[c], ds[c] =  sum(g * w),          t = w
   t is what autograd keeps anyway (the BatchNorm's input; the weight itself). */
void tsq_channel_scale_backward(const float* g, const float* t, float* gy, int64_t outer, int64_t C,
                                int64_t inner, const float* s, int divide, int nt, float* ds_out) {
    int64_t n = outer * C * inner;
    #pragma omp parallel for num_threads(nt) schedule(static) if(n >= PAR_MIN)
    for (int64_t c = 0; c < C; c++) {
        const float sc = s[c];
        double ds = 0.0;
        for (int64_t o = 0; o < outer; o++) {
            int64_t base = (o * C + c) * inner;
            for (int64_t b = 0; b < inner; b += BLK) {
                int64_t m = (inner - b < BLK) ? inner - b : BLK;
                const float* gb = g + base + b;
                const float* tb = t + base + b;
                float* yb = gy + base + b;
                float fs = 0.0f;
                if (divide) {
                    #pragma omp simd reduction(+:fs)
                    for (int64_t k = 0; k < m; k++) {
                        yb[k] = gb[k] / sc;
                        fs += gb[k] * tb[k];
                    }
                } else {
                    #pragma omp simd reduction(+:fs)
                    for (int64_t k = 0; k < m; k++) {
                        yb[k] = gb[k] * sc;
                        fs += gb[k] * tb[k];
                    }
                }
                ds += fs;
            }
        }
        ds_out[c] = (float)(divide ? -ds / sc : ds);
    }
}

/* Per channel, fixed quantizer: dx only. */
void tsq_backward_input_rows(const float* x, const float* g, float* dx, int64_t outer, int64_t C, int64_t inner,
                             const float* s, const float* z, float qmin, float qmax, int nt) {
    int64_t rows = outer * C;
    int64_t n = rows * inner;
    #pragma omp parallel for num_threads(nt) schedule(static) if(n >= PAR_MIN)
    for (int64_t r = 0; r < rows; r++) {
        int64_t c = r % C;
        const float zp = z[c], inv = 1.0f / s[c];
        const float* xr = x + r * inner;
        const float* gr = g + r * inner;
        float* dr = dx + r * inner;
        #pragma omp simd
        for (int64_t k = 0; k < inner; k++) {
            float q = zp + rintf(xr[k] * inv);
            dr[k] = gr[k] * ((q >= qmin && q <= qmax) ? 1.0f : 0.0f);
        }
    }
}

/* Training-mode BatchNorm of the BN-folding QAT layers' rescaled output t = y / s[c] (+ b[c]), computed on the
   convolution's output y itself: BatchNorm is invariant to a per-channel scale and shift but for eps, so
       BN(t) = (y - mean_y) / sqrt(var_y + eps * s^2) * gamma + beta.
   Per channel (each thread owns whole channels): the mean, then the squared deviations (double sums of float
   blocks), then one pass writes out = clamp(y * alpha + shift, lo, hi) (the fused ReLU / ReLU6, when on).
   The running statistics move as BatchNorm's do for t (unbiased variance). */
void tsq_bn_fold_forward(const float* y, float* out, int64_t outer, int64_t C, int64_t inner, const float* s,
                         const float* b, const float* gamma, const float* beta, float eps, float eaf, float* rmean,
                         float* rvar, int clamp, float lo, float hi, int nt, float* mean_out, float* invstd_out) {
    int64_t n = outer * C * inner, N = outer * inner;
    #pragma omp parallel for num_threads(nt) schedule(static) if(n >= PAR_MIN)
    for (int64_t c = 0; c < C; c++) {
        double sum = 0.0, sq = 0.0;
        for (int64_t o = 0; o < outer; o++) {
            const float* yr = y + (o * C + c) * inner;
            for (int64_t k0 = 0; k0 < inner; k0 += BLK) {
                int64_t m = (inner - k0 < BLK) ? inner - k0 : BLK;
                float fs = 0.0f;
                #pragma omp simd reduction(+:fs)
                for (int64_t k = 0; k < m; k++) fs += yr[k0 + k];
                sum += fs;
            }
        }
        const double mean = sum / (double)N;
        const float mf = (float)mean;
        for (int64_t o = 0; o < outer; o++) {
            const float* yr = y + (o * C + c) * inner;
            for (int64_t k0 = 0; k0 < inner; k0 += BLK) {
                int64_t m = (inner - k0 < BLK) ? inner - k0 : BLK;
                float fs = 0.0f;
                #pragma omp simd reduction(+:fs)
                for (int64_t k = 0; k < m; k++) { float d = yr[k0 + k] - mf; fs += d * d; }
                sq += fs;
            }
        }
        const double var = sq / (double)N, sc = s[c];
        const float inv = (float)(1.0 / sqrt(var + (double)eps * sc * sc));
        const float alpha = (gamma ? gamma[c] : 1.0f) * inv;
        const float shift = (beta ? beta[c] : 0.0f) - mf * alpha;
        for (int64_t o = 0; o < outer; o++) {
            const float* yr = y + (o * C + c) * inner;
            float* outr = out + (o * C + c) * inner;
            #pragma omp simd
            for (int64_t k = 0; k < inner; k++) {
                float v = yr[k] * alpha + shift;
                if (clamp) { v = (v < lo) ? lo : v; v = (v > hi) ? hi : v; }
                outr[k] = v;
            }
        }
        mean_out[c] = mf;
        invstd_out[c] = inv;
        if (rmean) {
            const double mt = mean / sc + (b ? b[c] : 0.0f);
            const double vt = var * (double)N / (double)(N - 1) / (sc * sc);
            rmean[c] = (float)((1.0 - eaf) * rmean[c] + eaf * mt);
            rvar[c] = (float)((1.0 - eaf) * rvar[c] + eaf * vt);
        }
    }
}

/* Its backward: the activation's mask from the output (lo < out < hi is the input's test too), BatchNorm's input
   gradient on y, and the gamma / beta / s gradients (s enters through eps * s^2 only). Two passes per channel:
   the sums of g and g * (y - mean), then dy. */
void tsq_bn_fold_backward(const float* g, const float* y, const float* out, float* dy, int64_t outer, int64_t C,
                          int64_t inner, const float* s, const float* mean, const float* invstd, const float* gamma,
                          float eps, float lo, float hi, int nt, float* dgamma, float* dbeta, float* ds) {
    int64_t n = outer * C * inner, N = outer * inner;
    #pragma omp parallel for num_threads(nt) schedule(static) if(n >= PAR_MIN)
    for (int64_t c = 0; c < C; c++) {
        const float mf = mean[c], inv = invstd[c], gm = gamma ? gamma[c] : 1.0f;
        double sg = 0.0, sgx = 0.0;
        for (int64_t o = 0; o < outer; o++) {
            int64_t base = (o * C + c) * inner;
            for (int64_t k0 = 0; k0 < inner; k0 += BLK) {
                int64_t m = (inner - k0 < BLK) ? inner - k0 : BLK;
                const float* gb = g + base + k0;
                const float* yb = y + base + k0;
                float fg = 0.0f, fgx = 0.0f;
                if (out) {
                    const float* ob = out + base + k0;
                    #pragma omp simd reduction(+:fg, fgx)
                    for (int64_t k = 0; k < m; k++) {
                        float gi = (ob[k] > lo && ob[k] < hi) ? gb[k] : 0.0f;
                        fg += gi;
                        fgx += gi * (yb[k] - mf);
                    }
                } else {
                    #pragma omp simd reduction(+:fg, fgx)
                    for (int64_t k = 0; k < m; k++) {
                        fg += gb[k];
                        fgx += gb[k] * (yb[k] - mf);
                    }
                }
                sg += fg;
                sgx += fgx;
            }
        }
        const float k1 = (float)(sg / (double)N);
        const float k2 = (float)(sgx / (double)N * inv * inv);
        const float a = gm * inv;
        for (int64_t o = 0; o < outer; o++) {
            int64_t base = (o * C + c) * inner;
            const float* gb = g + base;
            const float* yb = y + base;
            float* db = dy + base;
            if (out) {
                const float* ob = out + base;
                #pragma omp simd
                for (int64_t k = 0; k < inner; k++) {
                    float gi = (ob[k] > lo && ob[k] < hi) ? gb[k] : 0.0f;
                    db[k] = (gi - k1 - (yb[k] - mf) * k2) * a;
                }
            } else {
                #pragma omp simd
                for (int64_t k = 0; k < inner; k++) db[k] = (gb[k] - k1 - (yb[k] - mf) * k2) * a;
            }
        }
        const double dg = sgx * inv;
        dgamma[c] = (float)dg;
        dbeta[c] = (float)sg;
        /* d invstd / d s = -eps * s * invstd^3, and dL/d invstd = gamma * sum(g * (y - mean)) */
        ds[c] = (float)(-(double)eps * s[c] * gm * sgx * inv * inv * inv);
    }
}
