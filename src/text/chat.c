/* Chat templates rendered in C.
 *
 * dpoc does not embed a Jinja interpreter: the supported templates are few and
 * small, so each is written out here as the exact sequence of strings its Jinja
 * source prints (transformers renders with trim_blocks/lstrip_blocks and drops
 * the template's own whitespace through "{%-"/"{{-"; none of that reaches the
 * output of these templates). tests/unit/test_chat.c compares every kind byte
 * for byte with transformers' apply_chat_template on the real template sources
 * (tests/fixtures/chat, from tools/make_chat_fixtures.py).
 *
 * Sources of the templates mirrored here (the .jinja files under
 * tests/fixtures/chat):
 *   chatml   "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'
 *            + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if
 *            add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
 *   qwen2.5  Qwen2.5-Instruct's template (as shipped in TRL 1.16's chat_templates/)
 *   smollm2  SmolLM2-Instruct's template (GGUF metadata of SmolLM2-135M-Instruct)
 *   llama3   Meta-Llama-3-Instruct's template (as shipped in TRL 1.16)
 */
#include "dpoc/chat.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The default system messages are part of the templates' Jinja source; they are
 * also what dpoc_chat_detect looks for. */
static const char QWEN25_DEFAULT_SYSTEM[] = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";
static const char SMOLLM2_DEFAULT_SYSTEM[] = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

static const char KIND_CHOICES[] = "chatml, qwen2.5, smollm2, llama3";

static const struct {
    const char *name;
    dpoc_chat_kind kind;
} KIND_NAMES[] = {
    {"chatml", DPOC_CHAT_CHATML},
    {"qwen2.5", DPOC_CHAT_QWEN25},
    {"smollm2", DPOC_CHAT_SMOLLM2},
    {"llama3", DPOC_CHAT_LLAMA3},
};
#define N_KINDS (sizeof KIND_NAMES / sizeof KIND_NAMES[0])

int dpoc_chat_kind_from_name(const char *name) {
    if (!name) return -1;
    for (size_t i = 0; i < N_KINDS; i++)
        if (strcmp(name, KIND_NAMES[i].name) == 0) return (int)KIND_NAMES[i].kind;
    return -1;
}

const char *dpoc_chat_kind_name(dpoc_chat_kind kind) {
    for (size_t i = 0; i < N_KINDS; i++)
        if (KIND_NAMES[i].kind == kind) return KIND_NAMES[i].name;
    return "unknown"; /* never NULL: callers print it */
}

/* ---- detection ---- */

static int has(const char *s, const char *needle) { return strstr(s, needle) != NULL; }

/* The first needle found in s, or NULL. */
static const char *first_of(const char *s, const char *const *needles, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (has(s, needles[i])) return needles[i];
    return NULL;
}

static int unrecognised(dpoc_err *err, const char *why, const char *what) {
    return dpoc_errf(err, DPOC_EINPUT,
                     "unrecognised chat_template (%s%s%s%s); set the config key chat_template to one of %s", why,
                     what ? " '" : "", what ? what : "", what ? "'" : "", KIND_CHOICES);
}

/* Recognition works on key substrings rather than an exact comparison, so that a
 * template copied with other whitespace, quoting or line endings, or a
 * re-serialised one (GGUF, a fine-tune's tokenizer_config.json), is still
 * recognised. A template is only accepted when nothing in it suggests a rendering
 * other than the one implemented here: the lists of constructs below are the ways
 * real templates of the same families differ (a built-in dated system header,
 * thinking blocks, trimmed content, BOS/EOS tokens, role checks that raise, other
 * default system messages). Rejecting is always safe: the user can name the
 * template with the config key chat_template. */
int dpoc_chat_detect(const char *jinja, dpoc_chat_kind *kind, dpoc_err *err) {
    if (!kind) return dpoc_errf(err, DPOC_EINTERNAL, "dpoc_chat_detect: kind is NULL");
    if (!jinja || !*jinja) return unrecognised(err, "the tokenizer has no chat_template", NULL);

    int chatml = has(jinja, "<|im_start|>");
    int header = has(jinja, "<|start_header_id|>");
    if (chatml && header) return unrecognised(err, "it mixes ChatML and Llama 3 markers", NULL);

    /* Constructs that change the output of every supported kind. */
    static const char *const never[] = {
        "<think>", "reasoning_content", "enable_thinking", /* Qwen3 / SmolLM3 thinking blocks */
        "trim", "strip",                                    /* content rewritten (Llama 3 checked apart) */
        "raise_exception",                                  /* conversations refused by the template */
        "image", "video",                                   /* multimodal content blocks */
        "eos_token",
    };

    if (chatml) {
        const char *bad = first_of(jinja, never, sizeof never / sizeof never[0]);
        if (bad) return unrecognised(err, "a ChatML template with", bad);
        if (!has(jinja, "<|im_end|>")) return unrecognised(err, "ChatML without", "<|im_end|>");
        /* Without it the template renders no assistant header for add_generation_prompt. */
        if (!has(jinja, "add_generation_prompt")) return unrecognised(err, "ChatML without", "add_generation_prompt");
        if (has(jinja, "bos_token")) return unrecognised(err, "a ChatML template that prints", "bos_token");
        int qwen = has(jinja, QWEN25_DEFAULT_SYSTEM), smol = has(jinja, SMOLLM2_DEFAULT_SYSTEM);
        if (qwen && smol) return unrecognised(err, "it holds both Qwen2.5's and SmolLM2's default system messages", NULL);
        if (qwen) {
            *kind = DPOC_CHAT_QWEN25;
            return DPOC_OK;
        }
        if (smol) {
            *kind = DPOC_CHAT_SMOLLM2;
            return DPOC_OK;
        }
        /* Plain ChatML prints no system message of its own and treats every message
         * alike; a hard-coded system header is some other model's default system
         * message (Qwen2, Qwen1.5, Qwen2.5 base and VL: "You are a helpful assistant."). */
        if (has(jinja, "<|im_start|>system"))
            return unrecognised(err, "a ChatML template with a default system message other than Qwen2.5's or SmolLM2's",
                                NULL);
        static const char *const not_plain[] = {
            "tool", "loop.first", "loop.last", "loop.index", "messages[", "namespace", "endgeneration", /* {% generation %} blocks */
        };
        bad = first_of(jinja, not_plain, sizeof not_plain / sizeof not_plain[0]);
        if (bad) return unrecognised(err, "a ChatML variant that uses", bad);
        *kind = DPOC_CHAT_CHATML;
        return DPOC_OK;
    }

    if (header) {
        /* Llama 3.1/3.2/3.3 always write a system header with the knowledge cut-off
         * and today's date: a different rendering from Llama 3's. */
        static const char *const dated[] = {"Cutting Knowledge Date", "date_string", "strftime_now"};
        const char *bad = first_of(jinja, dated, sizeof dated / sizeof dated[0]);
        if (bad) return unrecognised(err, "a Llama 3.1+ template with a dated system header", bad);
        static const char *const need[] = {"<|end_header_id|>", "<|eot_id|>", "bos_token", "add_generation_prompt",
                                           "trim"};
        for (size_t i = 0; i < sizeof need / sizeof need[0]; i++)
            if (!has(jinja, need[i])) return unrecognised(err, "a Llama 3 header template without", need[i]);
        static const char *const other[] = {
            "<think>", "reasoning_content", "raise_exception", "image", "eos_token",
            "tool", "ipython", "system_message", "namespace", "strip",
        };
        bad = first_of(jinja, other, sizeof other / sizeof other[0]);
        if (bad) return unrecognised(err, "a Llama 3 header template that uses", bad);
        *kind = DPOC_CHAT_LLAMA3;
        return DPOC_OK;
    }

    return unrecognised(err, "no ChatML '<|im_start|>' or Llama 3 '<|start_header_id|>' markers", NULL);
}

/* ---- rendering ---- */

/* Output sink used twice: first with buf == NULL to measure, then to write into
 * a buffer of exactly the measured size, so there is one allocation and no
 * reallocation path to get wrong. */
typedef struct {
    char *buf;
    size_t len;
    int overflow;
} sink;

static void put_n(sink *s, const char *p, size_t n) {
    if (s->overflow || n == 0) return;
    if (n > SIZE_MAX - 1 - s->len) { /* keep room for the NUL */
        s->overflow = 1;
        return;
    }
    if (s->buf) memcpy(s->buf + s->len, p, n);
    s->len += n;
}

static void put(sink *s, const char *p) { put_n(s, p, strlen(p)); }

/* Length of the Python str.isspace() character that starts at p (0 if none).
 * Jinja's trim filter is Python's str.strip(): it removes the Unicode
 * whitespace of str.isspace(), i.e. U+0009-000D, U+001C-001F, U+0020, U+0085,
 * U+00A0, U+1680, U+2000-200A, U+2028, U+2029, U+202F, U+205F, U+3000 (not
 * U+200B, U+FEFF or U+180E). Matching their UTF-8 byte sequences directly
 * (rather than decoding) means a malformed sequence is simply not whitespace. */
static size_t space_at(const unsigned char *p, size_t avail) {
    if (avail >= 1 && ((p[0] >= 0x09 && p[0] <= 0x0D) || (p[0] >= 0x1C && p[0] <= 0x20))) return 1;
    if (avail >= 2 && p[0] == 0xC2 && (p[1] == 0x85 || p[1] == 0xA0)) return 2;
    if (avail >= 3) {
        if (p[0] == 0xE1 && p[1] == 0x9A && p[2] == 0x80) return 3; /* U+1680 */
        if (p[0] == 0xE2 && p[1] == 0x80 &&
            ((p[2] >= 0x80 && p[2] <= 0x8A) || p[2] == 0xA8 || p[2] == 0xA9 || p[2] == 0xAF))
            return 3;                                                /* U+2000-200A, 2028, 2029, 202F */
        if (p[0] == 0xE2 && p[1] == 0x81 && p[2] == 0x9F) return 3; /* U+205F */
        if (p[0] == 0xE3 && p[1] == 0x80 && p[2] == 0x80) return 3; /* U+3000 */
    }
    return 0;
}

/* Length of the whitespace character that ends at p + n (0 if none). In valid
 * UTF-8 the 1-3 byte candidates below start with an ASCII or lead byte, which
 * cannot be the tail of a longer character, so a suffix match is a character. */
static size_t space_before(const unsigned char *p, size_t n) {
    for (size_t k = 1; k <= 3 && k <= n; k++)
        if (space_at(p + n - k, k) == k) return k;
    return 0;
}

static void put_trimmed(sink *s, const char *text) {
    const unsigned char *p = (const unsigned char *)text;
    size_t n = strlen(text), k;
    while (n && (k = space_at(p, n)) != 0) {
        p += k;
        n -= k;
    }
    while (n && (k = space_before(p, n)) != 0) n -= k;
    put_n(s, (const char *)p, n);
}

static void put_chatml(sink *s, const dpoc_chat_msg *m) {
    put(s, "<|im_start|>");
    put(s, m->role);
    put(s, "\n");
    put(s, m->content);
    put(s, "<|im_end|>\n");
}

static int is_role(const dpoc_chat_msg *m, const char *role) { return strcmp(m->role, role) == 0; }

static void emit(dpoc_chat_kind kind, const dpoc_chat_msg *msgs, size_t n, int add_generation_prompt,
                 const char *bos_token, sink *s) {
    switch (kind) {
    case DPOC_CHAT_CHATML:
        for (size_t i = 0; i < n; i++) put_chatml(s, &msgs[i]);
        if (add_generation_prompt) put(s, "<|im_start|>assistant\n");
        break;

    case DPOC_CHAT_QWEN25:
        /* A leading system message is printed in the header; otherwise the default. */
        put(s, "<|im_start|>system\n");
        put(s, is_role(&msgs[0], "system") ? msgs[0].content : QWEN25_DEFAULT_SYSTEM);
        put(s, "<|im_end|>\n");
        /* The loop prints user and assistant (no tool_calls) messages, and system
         * messages except the first one (already printed above). */
        for (size_t i = 0; i < n; i++)
            if (!(i == 0 && is_role(&msgs[i], "system"))) put_chatml(s, &msgs[i]);
        if (add_generation_prompt) put(s, "<|im_start|>assistant\n");
        break;

    case DPOC_CHAT_SMOLLM2:
        /* The default system message is printed at loop.first unless messages[0]
         * is a system message; later system messages are ordinary turns. */
        if (!is_role(&msgs[0], "system")) {
            put(s, "<|im_start|>system\n");
            put(s, SMOLLM2_DEFAULT_SYSTEM);
            put(s, "<|im_end|>\n");
        }
        for (size_t i = 0; i < n; i++) put_chatml(s, &msgs[i]);
        if (add_generation_prompt) put(s, "<|im_start|>assistant\n");
        break;

    case DPOC_CHAT_LLAMA3:
        /* '<|start_header_id|>' + role + '<|end_header_id|>\n\n' + content | trim +
         * '<|eot_id|>': the filter binds tighter than '+', so only the content is
         * trimmed; bos_token is prepended to the first message. */
        put(s, bos_token);
        for (size_t i = 0; i < n; i++) {
            put(s, "<|start_header_id|>");
            put(s, msgs[i].role);
            put(s, "<|end_header_id|>\n\n");
            put_trimmed(s, msgs[i].content);
            put(s, "<|eot_id|>");
        }
        if (add_generation_prompt) put(s, "<|start_header_id|>assistant<|end_header_id|>\n\n");
        break;
    }
}

int dpoc_chat_render(dpoc_chat_kind kind, const dpoc_chat_msg *msgs, size_t n, int add_generation_prompt,
                     const char *bos_token, char **out, size_t *len, dpoc_err *err) {
    if (!out) return dpoc_errf(err, DPOC_EINTERNAL, "dpoc_chat_render: out is NULL");
    *out = NULL;
    if (len) *len = 0;
    int known = 0;
    for (size_t i = 0; i < N_KINDS; i++) known |= KIND_NAMES[i].kind == kind;
    if (!known) return dpoc_errf(err, DPOC_EINTERNAL, "dpoc_chat_render: unknown chat template kind %d", (int)kind);
    /* transformers refuses an empty conversation ("Cannot apply chat template to an
     * empty conversation"), and Qwen2.5's template reads messages[0]. */
    if (n == 0 || !msgs)
        return dpoc_errf(err, DPOC_EINPUT, "cannot apply the %s chat template to an empty conversation",
                         dpoc_chat_kind_name(kind));
    for (size_t i = 0; i < n; i++) {
        const dpoc_chat_msg *m = &msgs[i];
        if (!m->role) return dpoc_errf(err, DPOC_EINPUT, "chat message %zu has no role", i);
        if (!m->content) return dpoc_errf(err, DPOC_EINPUT, "chat message %zu (%s) has no content", i, m->role);
        /* Only the roles all four templates render alike; others ("tool",
         * "developer", ...) are printed by some templates, dropped by Qwen2.5's and
         * routed to its tool branch, so they are refused rather than guessed. */
        if (!is_role(m, "system") && !is_role(m, "user") && !is_role(m, "assistant"))
            return dpoc_errf(err, DPOC_EINPUT,
                             "chat message %zu: unknown role '%.100s' for the %s chat template (expected system, "
                             "user or assistant)",
                             i, m->role, dpoc_chat_kind_name(kind));
    }
    if (kind == DPOC_CHAT_LLAMA3 && !bos_token)
        return dpoc_errf(err, DPOC_EINPUT, "the llama3 chat template prints bos_token, but the tokenizer has none");

    sink s = {NULL, 0, 0};
    emit(kind, msgs, n, add_generation_prompt, bos_token, &s);
    if (s.overflow) return dpoc_errf(err, DPOC_ENOMEM, "rendered chat is larger than the address space");
    size_t total = s.len;
    char *buf = dpoc_malloc(total + 1, "rendered chat", err);
    if (!buf) return DPOC_ENOMEM;
    s = (sink){buf, 0, 0};
    emit(kind, msgs, n, add_generation_prompt, bos_token, &s);
    if (s.len != total || s.overflow) { /* the two passes print the same strings: a bug if not */
        free(buf);
        return dpoc_errf(err, DPOC_EINTERNAL, "internal check failed at %s:%d: chat render length", __FILE__,
                         __LINE__);
    }
    buf[total] = '\0';
    *out = buf;
    if (len) *len = total;
    return DPOC_OK;
}
