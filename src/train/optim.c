/* AdamW, LR schedules and clipping (see optim.h). */
#include "dpoc/optim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dpoc/gemm.h"
#include "model/kernels.h"

/* torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing. */
#define CLIP_NORM_EPS 1e-6
/* Parameters per AdamW chunk: 16K floats, with their gradients and moments 256 KiB (L2-resident). */
#define ADAMW_CHUNK ((size_t)16384)

int dpoc_adamw_init(dpoc_adamw *o, size_t n, const dpoc_config *c, size_t n_tensors, const size_t *offset,
                    const size_t *count, const int *decay, dpoc_err *err) {
    return dpoc_adamw_init_range(o, n, 0, n, c, n_tensors, offset, count, decay, err);
}

int dpoc_adamw_init_range(dpoc_adamw *o, size_t n, size_t lo, size_t hi, const dpoc_config *c, size_t n_tensors,
                          const size_t *offset, const size_t *count, const int *decay, dpoc_err *err) {
    memset(o, 0, sizeof *o);
    if (lo > hi || hi > n) return dpoc_errf(err, DPOC_EINTERNAL, "AdamW: slice [%zu, %zu) of %zu", lo, hi, n);
    o->n = n;
    o->lo = lo;
    o->hi = hi;
    o->m = dpoc_calloc(hi - lo + 1, sizeof(float), "AdamW first moments", err);
    o->v = dpoc_calloc(hi - lo + 1, sizeof(float), "AdamW second moments", err);
    o->ranges = dpoc_calloc(n_tensors + 1, sizeof *o->ranges, "AdamW decay ranges", err);
    if (!o->m || !o->v || !o->ranges) {
        dpoc_adamw_free(o);
        return DPOC_ENOMEM;
    }
    /* merge neighbouring tensors with the same setting; check they tile [0, n) */
    size_t pos = 0;
    for (size_t i = 0; i < n_tensors; i++) {
        if (offset[i] != pos) {
            dpoc_adamw_free(o);
            return dpoc_errf(err, DPOC_EINTERNAL, "AdamW: tensor %zu does not follow the previous one", i);
        }
        dpoc_decay_range *last = o->n_ranges ? &o->ranges[o->n_ranges - 1] : NULL;
        if (last && last->decay == (decay[i] != 0)) last->count += count[i];
        else o->ranges[o->n_ranges++] = (dpoc_decay_range){offset[i], count[i], decay[i] != 0};
        pos += count[i];
    }
    if (pos != n) {
        dpoc_adamw_free(o);
        return dpoc_errf(err, DPOC_EINTERNAL, "AdamW: the tensors cover %zu of %zu parameters", pos, n);
    }
    o->beta1 = c->adam_beta1;
    o->beta2 = c->adam_beta2;
    o->eps = c->adam_epsilon;
    o->weight_decay = c->weight_decay;
    return 0;
}

void dpoc_adamw_free(dpoc_adamw *o) {
    free(o->ranges);
    free(o->m);
    free(o->v);
    memset(o, 0, sizeof *o);
}

void dpoc_adamw_step(dpoc_adamw *o, float *restrict params, const float *restrict grads, float grad_scale,
                     double lr) {
    o->step++;
    const float b1 = (float)o->beta1, b2 = (float)o->beta2;
    const double bc1 = 1.0 - pow(o->beta1, (double)o->step);
    const double bc2 = 1.0 - pow(o->beta2, (double)o->step);
    /* torch: param *= 1 - lr*wd; m = lerp(m, g, 1-b1); v = b2*v + (1-b2)*g*g;
     * param -= (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps) */
    const float step_size = (float)(lr / bc1);
    const float bc2_sqrt = (float)sqrt(bc2);
    dpoc_adamw_coeffs c = {
        .grad_scale = grad_scale,
        .one_minus_b1 = 1.0f - b1,
        .b2 = b2,
        .one_minus_b2 = 1.0f - b2,
        .step_size = step_size,
        .bc2_sqrt = bc2_sqrt,
        .eps = (float)o->eps,
    };
    /* the element-wise update runs at the SIMD level of the other kernels (model/kernels.h) */
    const dpoc_kernel_table *kt = dpoc_kernels();
    /* In chunks that stay in cache, each followed by its part of the weights'
     * bf16 copy when the products read one (dpoc/gemm.h shadows; a no-op
     * otherwise): rounding the updated weights there costs almost nothing,
     * a separate pass over the whole block ~0.1 s a step for 135M weights. The
     * update is element-wise, so chunking changes no value. */
    for (size_t r = 0; r < o->n_ranges; r++) {
        c.decay = o->ranges[r].decay ? (float)(1.0 - lr * o->weight_decay) : 1.0f;
        /* the range's part inside this optimizer's slice [lo, hi) */
        const size_t from = o->ranges[r].offset > o->lo ? o->ranges[r].offset : o->lo;
        const size_t to = o->ranges[r].offset + o->ranges[r].count;
        const size_t end = to < o->hi ? to : o->hi;
        for (size_t off = from; off < end; off += ADAMW_CHUNK) {
            const size_t n = end - off < ADAMW_CHUNK ? end - off : ADAMW_CHUNK;
            const size_t k = off - o->lo;
            kt->adamw_update(params + off, grads + k, o->m + k, o->v + k, n, &c);
            dpoc_gemm_shadow_refresh_range(params, off, n);
        }
    }
}

double dpoc_grad_norm(const float *grads, size_t n) { return sqrt(dpoc_kernels()->sum_squares(grads, n)); }

float dpoc_clip_coef(double norm, double max_norm) {
    if (!(max_norm > 0)) return 1.0f;
    const double coef = max_norm / (norm + CLIP_NORM_EPS);
    return coef >= 1.0 ? 1.0f : (float)coef;
}

void dpoc_clip_grads(float *grads, size_t n, double norm, double max_norm) {
    const float c = dpoc_clip_coef(norm, max_norm);
    if (c == 1.0f) return;
    for (size_t i = 0; i < n; i++) grads[i] *= c;
}

long dpoc_warmup_steps(const dpoc_config *c, long total) {
    if (c->warmup_steps >= 1.0) return (long)c->warmup_steps;
    double ratio = c->warmup_steps > 0 ? c->warmup_steps : c->warmup_ratio;
    return (long)ceil((double)total * ratio);
}

double dpoc_lr_lambda(const dpoc_config *c, long step, long warmup, long total) {
    const double PI = 3.14159265358979323846;
    if (c->lr_scheduler_type == DPOC_SCHED_CONSTANT) return 1.0;
    if (step < warmup) return (double)step / (double)(warmup > 1 ? warmup : 1);
    long span = total - warmup > 1 ? total - warmup : 1;
    double progress = (double)(step - warmup) / (double)span;
    switch (c->lr_scheduler_type) {
    case DPOC_SCHED_CONSTANT_WARMUP: return 1.0;
    case DPOC_SCHED_LINEAR: {
        double f = (double)(total - step) / (double)span;
        return f > 0 ? f : 0.0;
    }
    case DPOC_SCHED_COSINE: {
        double f = 0.5 * (1.0 + cos(PI * c->num_cycles * 2.0 * progress));
        return f > 0 ? f : 0.0;
    }
    case DPOC_SCHED_COSINE_MIN_LR: {
        double rate = c->min_lr_rate >= 0 ? c->min_lr_rate : c->min_lr / c->learning_rate;
        double f = 0.5 * (1.0 + cos(PI * c->num_cycles * 2.0 * progress));
        f = f * (1.0 - rate) + rate;
        return f > 0 ? f : 0.0;
    }
    default: return 1.0;
    }
}
