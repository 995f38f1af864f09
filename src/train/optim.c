/* AdamW, LR schedules and clipping (see optim.h). */
#include "dpoc/optim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing. */
#define CLIP_NORM_EPS 1e-6

int dpoc_adamw_init(dpoc_adamw *o, size_t n, const dpoc_config *c, dpoc_err *err) {
    memset(o, 0, sizeof *o);
    o->n = n;
    o->m = dpoc_calloc(n, sizeof(float), "AdamW first moments", err);
    o->v = dpoc_calloc(n, sizeof(float), "AdamW second moments", err);
    if (!o->m || !o->v) {
        dpoc_adamw_free(o);
        return DPOC_ENOMEM;
    }
    o->beta1 = c->adam_beta1;
    o->beta2 = c->adam_beta2;
    o->eps = c->adam_epsilon;
    o->weight_decay = c->weight_decay;
    return 0;
}

void dpoc_adamw_free(dpoc_adamw *o) {
    free(o->m);
    free(o->v);
    memset(o, 0, sizeof *o);
}

void dpoc_adamw_step(dpoc_adamw *o, float *restrict params, const float *restrict grads, double lr) {
    o->step++;
    const float b1 = (float)o->beta1, b2 = (float)o->beta2;
    const double bc1 = 1.0 - pow(o->beta1, (double)o->step);
    const double bc2 = 1.0 - pow(o->beta2, (double)o->step);
    /* torch: param *= 1 - lr*wd; m = lerp(m, g, 1-b1); v = b2*v + (1-b2)*g*g;
     * param -= (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps) */
    const float decay = (float)(1.0 - lr * o->weight_decay);
    const float step_size = (float)(lr / bc1);
    const float bc2_sqrt = (float)sqrt(bc2);
    const float eps = (float)o->eps;
    float *restrict m = o->m, *restrict v = o->v;
    for (size_t i = 0; i < o->n; i++) {
        float g = grads[i];
        params[i] *= decay;
        m[i] += (g - m[i]) * (1.0f - b1);
        v[i] = v[i] * b2 + (1.0f - b2) * g * g;
        float denom = sqrtf(v[i]) / bc2_sqrt + eps;
        params[i] -= step_size * m[i] / denom;
    }
}

double dpoc_grad_norm(const float *grads, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)grads[i] * (double)grads[i];
    return sqrt(s);
}

void dpoc_clip_grads(float *grads, size_t n, double norm, double max_norm) {
    if (!(max_norm > 0)) return;
    double coef = max_norm / (norm + CLIP_NORM_EPS);
    if (coef >= 1.0) return;
    const float c = (float)coef;
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
