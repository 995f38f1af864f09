/* The runtime context (see include/dpoc/runtime.h). */
#include "dpoc/runtime.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>
#include <cjson/cJSON.h>

#define PRECISION_DEFAULT_WHY "bf16 false"

static dpoc_runtime rt;
static pthread_once_t rt_once = PTHREAD_ONCE_INIT;

static void rt_init(void) {
    dpoc_cpu_detect(&rt.cpu);
    dpoc_blas_query(&rt.blas);
    /* OpenBLAS ignores an empty OPENBLAS_CORETYPE (it detects the CPU as if it
     * were unset), so an empty one is no choice of the user's to respect */
    const char *core = getenv(DPOC_OPENBLAS_CORETYPE_ENV);
    if (core && !*core) core = NULL;
    const char *from = getenv(DPOC_BLAS_REEXEC_ENV);
    if (core) snprintf(rt.blas_coretype, sizeof rt.blas_coretype, "%s", core);
    if (from && *from) snprintf(rt.blas_chosen_alone, sizeof rt.blas_chosen_alone, "%s", from);
    dpoc_blas_situation s = {
        .cpu_isa = dpoc_cpu_isa_level(rt.cpu.features),
        .vendor = rt.cpu.vendor,
        .kernel = rt.blas.kernel,
        .dynamic_arch = rt.blas.dynamic_arch,
        .user_coretype = core && !rt.blas_chosen_alone[0] ? core : NULL,
        .reexec_from = rt.blas_chosen_alone[0] ? rt.blas_chosen_alone : NULL,
    };
    dpoc_blas_decide(&s, &rt.blas_decision);
    rt.simd_level = -1;
    rt.precision = DPOC_PRECISION_FP32;
    snprintf(rt.precision_why, sizeof rt.precision_why, PRECISION_DEFAULT_WHY);
}

dpoc_runtime *dpoc_rt(void) {
    pthread_once(&rt_once, rt_init);
    return &rt;
}

void dpoc_runtime_refresh_blas(void) { dpoc_rt()->blas.threads = openblas_get_num_threads(); }

int dpoc_runtime_check_blas(dpoc_err *err) {
    dpoc_runtime *r = dpoc_rt();
    if (r->blas_check_state) return 0;
    dpoc_runtime_refresh_blas();
    int rc = dpoc_blas_self_check(NULL, &r->blas, &r->blas_check_s, err);
    if (!rc) r->blas_check_state = 1;
    return rc;
}

void dpoc_runtime_skip_blas_check(void) { dpoc_rt()->blas_check_state = -1; }

static const char *precision_name(dpoc_precision p) { return p == DPOC_PRECISION_BF16 ? "bf16" : "fp32"; }

static const char *coretype_by(const dpoc_runtime *r) {
    if (!r->blas_coretype[0]) return "";
    return r->blas_chosen_alone[0] ? "dpoc" : "user";
}

void dpoc_runtime_describe(char *buf, size_t n) {
    const dpoc_runtime *r = dpoc_rt();
    char feats[160], check[64];
    const unsigned extra = r->cpu.features & (DPOC_CPU_AVX512_BF16 | DPOC_CPU_AMX_BF16 | DPOC_CPU_AMX_TILE);
    dpoc_cpu_feature_names(extra, feats, sizeof feats);
    const char *kernel_note = r->blas_decision.action == DPOC_BLAS_KEEP && !r->blas_chosen_alone[0]
                                  ? "chosen by OpenBLAS"
                                  : r->blas_decision.why;
    /* the precision needs no explanation when bf16 was simply not asked for */
    const int plain = r->precision == DPOC_PRECISION_FP32 && !strcmp(r->precision_why, PRECISION_DEFAULT_WHY);
    if (r->blas_check_state > 0) snprintf(check, sizeof check, "self-check passed (%.0f ms)", r->blas_check_s * 1e3);
    else if (r->blas_check_state < 0) snprintf(check, sizeof check, "self-check SKIPPED (--skip-blas-check)");
    else snprintf(check, sizeof check, "self-check not run");
    snprintf(buf, n,
             "CPU %s (%s family %u model %u, %s%s%s, %ld cores); dpoc kernels %s; BLAS %s %s, %s kernels (%s), "
             "%d thread(s), %s; matrix products %s%s%s%s",
             r->cpu.model_name, r->cpu.vendor_id, r->cpu.family, r->cpu.model,
             dpoc_isa_name(dpoc_cpu_isa_level(r->cpu.features)), feats[0] ? " " : "", feats, r->cpu.cores,
             r->simd_name[0] ? r->simd_name : "not chosen yet", r->blas.library, r->blas.version, r->blas.kernel,
             kernel_note, r->blas.threads, check, precision_name(r->precision), plain ? "" : " (",
             plain ? "" : r->precision_why, plain ? "" : ")");
}

char *dpoc_runtime_json(void) {
    const dpoc_runtime *r = dpoc_rt();
    cJSON *o = cJSON_CreateObject();
    if (!o) return NULL;
    char feats[256];
    dpoc_cpu_feature_names(r->cpu.features, feats, sizeof feats);
    cJSON_AddStringToObject(o, "cpu", r->cpu.model_name);
    cJSON_AddStringToObject(o, "cpu_vendor", r->cpu.vendor_id);
    cJSON_AddNumberToObject(o, "cpu_family", r->cpu.family);
    cJSON_AddNumberToObject(o, "cpu_model", r->cpu.model);
    cJSON_AddNumberToObject(o, "cpu_stepping", r->cpu.stepping);
    cJSON_AddStringToObject(o, "cpu_isa", dpoc_isa_name(dpoc_cpu_isa_level(r->cpu.features)));
    cJSON_AddStringToObject(o, "cpu_features", feats);
    cJSON_AddNumberToObject(o, "cpu_cores", (double)r->cpu.cores);
    cJSON_AddNumberToObject(o, "cpu_clock_ghz", r->cpu.clock_ghz);
    cJSON_AddStringToObject(o, "cpu_clock_source", r->cpu.clock_source);
    cJSON_AddStringToObject(o, "simd", r->simd_name[0] ? r->simd_name : "");
    cJSON_AddStringToObject(o, "blas", r->blas.library);
    cJSON_AddStringToObject(o, "blas_version", r->blas.version);
    cJSON_AddStringToObject(o, "blas_config", r->blas.config);
    cJSON_AddStringToObject(o, "blas_kernel", r->blas.kernel);
    cJSON_AddStringToObject(o, "blas_kernel_isa", dpoc_isa_name(r->blas.kernel_isa));
    cJSON_AddNumberToObject(o, "blas_threads", r->blas.threads);
    cJSON_AddStringToObject(o, "blas_coretype", r->blas_coretype);
    cJSON_AddStringToObject(o, "blas_coretype_set_by", coretype_by(r));
    cJSON_AddStringToObject(o, "blas_chosen_alone", r->blas_chosen_alone);
    cJSON_AddStringToObject(o, "blas_decision", r->blas_decision.why);
    cJSON_AddStringToObject(o, "blas_self_check",
                            r->blas_check_state > 0 ? "passed" : r->blas_check_state < 0 ? "skipped" : "not run");
    cJSON_AddNumberToObject(o, "blas_self_check_s", r->blas_check_s);
    cJSON_AddStringToObject(o, "precision", precision_name(r->precision));
    cJSON_AddStringToObject(o, "precision_decision", r->precision_why);
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}
