// Tests of the plugins' host logic without TensorRT (common/kvzapPluginHost.cpp), linked with
// libkvzap_kernels.so for the split heuristic and workspace size. Run by tests/test_trt_plugins.py:
//   testPluginHost fields|io|shapes|workspace
// prints each failed check and exits 1 if any failed.

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "kvzapPluginHost.h"
#include "kvzap_kernels.h"
#include "testCheck.h"

using namespace kvzap_trt;

namespace {

bool contains(std::string const& s, char const* part) { return s.find(part) != std::string::npos; }

// ---------------------------------------------------------------- fields

struct FieldCase {
    char const* what;
    std::vector<Field> fields;
    char const* error;   // nullptr: must parse
    int32_t window = 4;  // what a parsed `window` must be
};

void testFields() {
    int32_t const layer3 = 3, layerNeg = -1, layerNeg2 = -2, two[2] = {1, 2}, window4 = 4, window0 = 0;
    float const scale = 0.125f, zero = 0.f, negative = -1.f, inf = std::numeric_limits<float>::infinity(),
                nan = std::numeric_limits<float>::quiet_NaN(), ninf = -inf;
    Field const layer{"layer", &layer3, kFIELD_INT32, 1}, sc{"scale", &scale, kFIELD_FLOAT32, 1},
        win{"window", &window4, kFIELD_INT32, 1};
    // The window field's own cases, the same for both plugins (`rest`: the plugin's other fields).
    auto windowCases = [&](std::vector<Field> const& rest) {
        auto with = [&](std::vector<Field> v) {
            v.insert(v.begin() + 1, rest.begin(), rest.end());
            return v;
        };
        return std::vector<FieldCase>{
            {"window 0", with({layer, {"window", &window0, kFIELD_INT32, 1}}), nullptr, 0},
            {"no window", with({layer}), "missing field 'window' (int32)"},
            {"window -1", with({layer, {"window", &layerNeg, kFIELD_INT32, 1}}), "field 'window' must be >= 0, got -1"},
            {"window as float32", with({layer, {"window", &scale, kFIELD_FLOAT32, 1}}),
             "'window' must be int32, got float32"},
            {"window twice", with({layer, win, win}), "'window' given twice"},
            {"windows", with({layer, {"windows", &window4, kFIELD_INT32, 1}}), "unknown field 'windows'"},
        };
    };

    std::vector<FieldCase> attention{
        {"all three", {layer, win, sc}, nullptr},
        {"any order", {sc, layer, win}, nullptr},
        {"none", {}, "missing field 'layer'"},
        {"no scale", {layer, win}, "missing field 'scale'"},
        {"scale as int32", {layer, win, {"scale", &layer3, kFIELD_INT32, 1}}, "'scale' must be float32, got int32"},
        {"layer as float32", {{"layer", &scale, kFIELD_FLOAT32, 1}, win, sc}, "'layer' must be int32, got float32"},
        {"layer of another type", {{"layer", &layer3, 10, 1}, win, sc}, "'layer' must be int32, got another type"},
        {"two values", {{"layer", two, kFIELD_INT32, 2}, win, sc}, "must hold one value, got 2"},
        {"no value", {{"layer", &layer3, kFIELD_INT32, 0}, win, sc}, "must hold one value, got 0"},
        {"unknown", {layer, win, sc, {"threshold", &scale, kFIELD_FLOAT32, 1}},
         "unknown field 'threshold' (fields: layer, window, scale)"},
        {"twice", {layer, win, sc, layer}, "'layer' given twice"},
        {"no name", {{nullptr, &layer3, kFIELD_INT32, 1}, win, sc}, "field 0 has no name"},
        {"no data", {{"layer", nullptr, kFIELD_INT32, 1}, win, sc}, "'layer' has no data"},
        {"layer -1", {{"layer", &layerNeg, kFIELD_INT32, 1}, win, sc}, "'layer' must be >= 0"},
        {"scale 0", {layer, win, {"scale", &zero, kFIELD_FLOAT32, 1}}, "'scale' must be finite and > 0"},
        {"scale < 0", {layer, win, {"scale", &negative, kFIELD_FLOAT32, 1}}, "'scale' must be finite and > 0"},
        {"scale inf", {layer, win, {"scale", &inf, kFIELD_FLOAT32, 1}}, "'scale' must be finite and > 0"},
        {"scale nan", {layer, win, {"scale", &nan, kFIELD_FLOAT32, 1}}, "'scale' must be finite and > 0"},
    };
    for (FieldCase const& c : windowCases({sc})) attention.push_back(c);
    for (auto const& c : attention) {
        AttentionFields f;
        f.layer = 77;
        std::string const e = parseAttentionFields(c.fields.data(), static_cast<int32_t>(c.fields.size()), f);
        if (c.error == nullptr) {
            CHECK(e.empty() && f.layer == 3 && f.window == c.window && f.scale == 0.125f, "attention %s: '%s'", c.what,
                  e.c_str());
        } else {
            CHECK(contains(e, c.error) && contains(e, "KvzapVarlenPagedAttention"), "attention %s: '%s'", c.what,
                  e.c_str());
            CHECK(f.layer == 77, "attention %s: a rejected collection wrote the result", c.what);
        }
    }
    AttentionFields a;
    CHECK(contains(parseAttentionFields(nullptr, 2, a), "no field collection"), "null fields");

    Field const th{"threshold", &negative, kFIELD_FLOAT32, 1};
    std::vector<FieldCase> evict{
        {"all three", {layer, win, th}, nullptr},
        {"layer -1 (all layers)", {{"layer", &layerNeg, kFIELD_INT32, 1}, win, th}, nullptr},
        {"threshold -inf", {layer, win, {"threshold", &ninf, kFIELD_FLOAT32, 1}}, nullptr},
        {"threshold +inf", {layer, win, {"threshold", &inf, kFIELD_FLOAT32, 1}}, nullptr},
        {"layer -2", {{"layer", &layerNeg2, kFIELD_INT32, 1}, win, th}, "'layer' must be >= 0, or -1 for all layers"},
        {"threshold nan", {layer, win, {"threshold", &nan, kFIELD_FLOAT32, 1}}, "'threshold' is NaN"},
        {"no threshold", {layer, win}, "missing field 'threshold'"},
        {"scale is attention's", {layer, win, th, sc}, "unknown field 'scale' (fields: layer, window, threshold)"},
        {"threshold as int32", {layer, win, {"threshold", &layer3, kFIELD_INT32, 1}}, "'threshold' must be float32"},
    };
    for (FieldCase const& c : windowCases({th})) evict.push_back(c);
    for (auto const& c : evict) {
        EvictFields f;
        f.window = 77;
        std::string const e = parseEvictFields(c.fields.data(), static_cast<int32_t>(c.fields.size()), f);
        if (c.error == nullptr) {
            CHECK(e.empty() && f.window == c.window, "evict %s: '%s'", c.what, e.c_str());
        } else {
            CHECK(contains(e, c.error) && contains(e, "KvzapEvict"), "evict %s: '%s'", c.what, e.c_str());
            CHECK(f.window == 77, "evict %s: a rejected collection wrote the result", c.what);
        }
    }

    // What a plugin serializes parses back to itself (the runtime phase's createPlugin).
    AttentionFields const af{5, 4096, 0.0883883f};
    std::vector<Field> const out = attentionFieldsOf(af);
    AttentionFields back;
    CHECK(out.size() == 3 && parseAttentionFields(out.data(), 3, back).empty() && back.layer == 5 &&
              back.window == 4096 && back.scale == af.scale,
          "round trip");
    EvictFields const ef{-1, 0, -6.5f};
    std::vector<Field> const eout = evictFieldsOf(ef);
    EvictFields eback;
    eback.window = 77;
    CHECK(eout.size() == 3 && parseEvictFields(eout.data(), 3, eback).empty() && eback.layer == -1 &&
              eback.window == 0 && eback.threshold == -6.5f,
          "evict round trip");
}

// ---------------------------------------------------------------- I/O tables

void testIo() {
    for (PluginIo const* io : {&attentionIo(), &evictIo()}) {
        int32_t const nbIn = static_cast<int32_t>(io->inputs.size());
        std::vector<int> aliasedBy(nbIn, 0);
        for (auto const& o : io->outputs) {
            CHECK(o.followsInput >= 0 && o.followsInput < nbIn, "%s follows no input", o.name);
            CHECK(io->inputs[o.followsInput].kind == o.kind, "%s: kind differs from its input", o.name);
            if (o.aliasedInput >= 0) {
                CHECK(o.aliasedInput == o.followsInput, "%s aliases another input than it follows", o.name);
                CHECK(std::string(o.name) == std::string(io->inputs[o.aliasedInput].name) + "_out", "%s", o.name);
                ++aliasedBy[o.aliasedInput];
            }
        }
        for (int32_t i = 0; i < nbIn; ++i) CHECK(aliasedBy[i] <= 1, "input %s aliased twice", io->inputs[i].name);
        // dtype rules: position 0 fixes the K/V dtype; int32 and float32 tensors whatever it is.
        int32_t const nb = nbIn + static_cast<int32_t>(io->outputs.size());
        for (int32_t data : {kDTYPE_FLOAT, kDTYPE_HALF, kDTYPE_BF16}) {
            CHECK(supportsDtype(*io, 0, data, data), "position 0 refuses dtype %d", data);
            for (int32_t pos = 0; pos < nb; ++pos) {
                IoSpec const& s = pos < nbIn ? io->inputs[pos] : io->outputs[pos - nbIn];
                for (int32_t t : {0, 1, 3, 7, 8 /* int64 */, 2 /* int8 */}) {
                    bool const want = s.kind == Kind::kINT32     ? t == kDTYPE_INT32
                                      : s.kind == Kind::kFLOAT32 ? t == kDTYPE_FLOAT
                                      : pos == 0                 ? dtypeBytes(t) > 0
                                                                 : t == data;
                    CHECK(supportsDtype(*io, pos, t, data) == want, "%s dtype %d with data %d", s.name, t, data);
                }
            }
        }
        CHECK(!supportsDtype(*io, 0, kDTYPE_INT32, kDTYPE_INT32), "position 0 takes int32");
        CHECK(!supportsDtype(*io, nb, kDTYPE_INT32, kDTYPE_FLOAT) && !supportsDtype(*io, -1, kDTYPE_INT32, kDTYPE_FLOAT),
              "out of range positions");
    }
    PluginIo const& a = attentionIo();
    CHECK(a.inputs.size() == attn::kNB_INPUTS && a.outputs.size() == attn::kNB_OUTPUTS, "attention counts");
    CHECK(a.outputs[attn::kOUT].aliasedInput == -1 && a.outputs[attn::kOUT].followsInput == attn::kQ, "out");
    CHECK(a.inputs[attn::kSEQ_SLOTS].kind == Kind::kINT32 && a.inputs[attn::kRING_TABLE].kind == Kind::kINT32 &&
              a.inputs[attn::kK_POOL].kind == Kind::kDATA,
          "kinds");
    CHECK(std::string(a.outputs[attn::kNB_OUTPUTS - 2].name) == "ring_table_out", "attention ring_table_out");
    PluginIo const& e = evictIo();
    CHECK(e.inputs.size() == evict::kNB_INPUTS && e.outputs.size() == evict::kNB_OUTPUTS, "evict counts");
    CHECK(e.inputs[evict::kSCORES].kind == Kind::kFLOAT32 && e.inputs[evict::kSCORE_POOL].kind == Kind::kFLOAT32,
          "scores are float32");
    CHECK(e.inputs[evict::kRING_TABLE].kind == Kind::kINT32 && e.inputs[evict::kPOS_POOL].kind == Kind::kINT32, "kinds");
    CHECK(e.outputs.size() == evict::kNB_INPUTS - evict::kK_POOL && e.outputs.front().aliasedInput == evict::kK_POOL,
          "evict outputs: inputs k_pool.. in order");
    for (auto const& o : e.outputs) CHECK(o.aliasedInput >= evict::kK_POOL, "evict output %s not aliased", o.name);

    // enqueue's aliasing check: every aliased output must be its input's memory, but for empty tensors.
    std::vector<char> memory(evict::kNB_INPUTS);
    std::vector<void const*> ins(evict::kNB_INPUTS);
    std::vector<void*> outs(evict::kNB_OUTPUTS);
    std::vector<Shape> shapes(evict::kNB_INPUTS);
    for (int32_t i = 0; i < evict::kNB_INPUTS; ++i) {
        ins[i] = &memory[i];
        shapes[i].nbDims = 1;
        shapes[i].d[0] = 3;
    }
    for (int32_t o = 0; o < evict::kNB_OUTPUTS; ++o) outs[o] = const_cast<void*>(ins[e.outputs[o].aliasedInput]);
    CHECK(aliasingProblem(e, shapes.data(), ins.data(), outs.data()).empty(), "in place refused");
    char elsewhere = 0;
    outs[evict::kKEPT_LEN - evict::kK_POOL] = &elsewhere;
    std::string const why = aliasingProblem(e, shapes.data(), ins.data(), outs.data());
    CHECK(contains(why, "output kept_len_out is not the memory of its input kept_len") &&
              contains(why, "ALIASED_PLUGIN_IO_10_03"),
          "%s", why.c_str());
    shapes[evict::kKEPT_LEN].d[0] = 0;  // an empty tensor's address means nothing
    CHECK(aliasingProblem(e, shapes.data(), ins.data(), outs.data()).empty(), "empty tensor refused");
    std::vector<void const*> ains(attn::kNB_INPUTS);
    std::vector<void*> aouts(attn::kNB_OUTPUTS);
    std::vector<Shape> ashapes(attn::kNB_INPUTS, shapes[0]);
    for (int32_t i = 0; i < attn::kNB_INPUTS; ++i) ains[i] = &memory[i];
    for (int32_t o = 0; o < attn::kNB_OUTPUTS; ++o)
        aouts[o] = a.outputs[o].aliasedInput < 0 ? &elsewhere : const_cast<void*>(ains[a.outputs[o].aliasedInput]);
    CHECK(aliasingProblem(a, ashapes.data(), ains.data(), aouts.data()).empty(), "attention's out is not aliased");

    // enqueue's alignment check: K/V-typed tensors with elements on 16-byte boundaries, others anywhere.
    alignas(16) static char pool[16 * (attn::kNB_INPUTS + 1)];
    for (int32_t i = 0; i < attn::kNB_INPUTS; ++i) ains[i] = pool + 16 * i + (a.inputs[i].kind == Kind::kDATA ? 0 : 4);
    aouts[attn::kOUT] = pool + 16 * attn::kNB_INPUTS;
    for (int32_t o = 1; o < attn::kNB_OUTPUTS; ++o) aouts[o] = const_cast<void*>(ains[a.outputs[o].aliasedInput]);
    CHECK(alignmentProblem(a, ashapes.data(), ains.data(), aouts.data()).empty(), "int32 inputs need no alignment");
    ains[attn::kV_POOL] = pool + 16 * attn::kV_POOL + 2;
    for (int32_t o = 1; o < attn::kNB_OUTPUTS; ++o) aouts[o] = const_cast<void*>(ains[a.outputs[o].aliasedInput]);
    std::string const misaligned = alignmentProblem(a, ashapes.data(), ains.data(), aouts.data());
    CHECK(contains(misaligned, "input v_pool is not 16-byte aligned"), "%s", misaligned.c_str());
    ashapes[attn::kV_POOL].d[0] = 0;  // an empty pool: its address is never read
    CHECK(alignmentProblem(a, ashapes.data(), ains.data(), aouts.data()).empty(), "empty tensor refused");
    aouts[attn::kOUT] = pool + 16 * attn::kNB_INPUTS + 8;
    std::string const out = alignmentProblem(a, ashapes.data(), ains.data(), aouts.data());
    CHECK(contains(out, "output out is not 16-byte aligned"), "%s", out.c_str());
}

// ---------------------------------------------------------------- shapes

Shape shape(std::vector<int64_t> const& d) {
    Shape s;
    s.nbDims = static_cast<int32_t>(d.size());
    for (size_t i = 0; i < d.size(); ++i) s.d[i] = d[i];
    return s;
}

bool same(Shape const& a, Shape const& b) {
    if (a.nbDims != b.nbDims) return false;
    for (int32_t i = 0; i < a.nbDims; ++i)
        if (a.d[i] != b.d[i]) return false;
    return true;
}

struct Dims {
    int64_t N, Hq, H, D, B, L, S, M, NB, BS, W;
};

// ring_table's columns: ceil(W / BS).
int64_t ringPages(Dims const& d) { return d.BS > 0 ? (d.W + d.BS - 1) / d.BS : 0; }

AttentionFields attentionFields(Dims const& d, int32_t layer = 0) { return {layer, static_cast<int32_t>(d.W), 0.125f}; }
EvictFields evictFields(Dims const& d, int32_t layer) { return {layer, static_cast<int32_t>(d.W), 0.f}; }

std::vector<Shape> attentionInputs(Dims const& d) {
    return {shape({d.N, d.Hq, d.D}), shape({d.N, d.H, d.D}), shape({d.N, d.H, d.D}), shape({d.B + 1}), shape({d.B}),
            shape({d.B}), shape({d.NB, d.BS, d.D}), shape({d.NB, d.BS, d.D}), shape({d.L, d.S, d.H, d.M}),
            shape({d.L, d.S, d.H}), shape({d.L, d.S, d.H, ringPages(d)}), shape({1}),
            shape({d.M * d.BS + d.W + d.N})};  // max_keys: the capacity bound, no tighter
}

std::vector<Shape> evictInputs(Dims const& d, bool all) {
    auto per = [&](std::vector<int64_t> v) {
        if (all) v.insert(v.begin(), d.L);
        return shape(v);
    };
    return {per({d.N, d.H, d.D}), per({d.N, d.H, d.D}), per({d.N, d.H}), shape({d.B + 1}), shape({d.B}),
            shape({d.B}), shape({d.NB, d.BS, d.D}), shape({d.NB, d.BS, d.D}), shape({d.NB, d.BS}), shape({d.NB, d.BS}),
            shape({d.L, d.S, d.H, d.M}), shape({d.L, d.S, d.H}), shape({d.L, d.S, d.H, ringPages(d)}), shape({d.NB}),
            shape({1}), shape({1})};
}

// N, Hq, H, D, B, L, S, M, NB, BS, W: decode, prefill, odd sizes, W = 0, W not a multiple of the
// page, an empty batch, GQA 1..8.
std::vector<Dims> const kCases{
    {8, 32, 8, 128, 8, 36, 64, 2048, 100000, 16, 128},  // Qwen3-8B-like decode, R = 8
    {577, 9, 3, 64, 3, 30, 4, 300, 4000, 24, 17},       // SmolLM2-like chunked prefill, R = 1
    {1, 4, 4, 64, 1, 1, 1, 1, 1, 1, 0},                 // one token, W = 0 (R = 0), page size 1
    {5, 4, 4, 64, 2, 1, 3, 4, 64, 16, 0},               // W = 0 (R = 0), page size 16
    {0, 16, 2, 128, 0, 2, 8, 64, 512, 64, 32},          // empty batch, R = 1
    {4096, 56, 7, 128, 1, 4, 2, 512, 4096, 64, 1024},   // G = 8, long prefill, R = 16
    {3, 8, 2, 64, 2, 2, 2, 8, 64, 16, 33},              // R = 3, the last window page part-used
};

// ring_table [L, S, H, ceil(window / block_size)]: the window is a field, so a ring_table made for
// another window, or in the old [L, S, H, W, D] layout, is refused, naming ring_table.
void testRingTable() {
    Dims const d{3, 8, 2, 64, 2, 2, 2, 8, 64, 16, 33};  // R = 3
    auto attention = [&](std::vector<Shape> const& in, int32_t window) {
        CallDims c;
        return checkAttentionShapes(in.data(), attn::kNB_INPUTS, {0, window, 0.125f}, kDTYPE_HALF, c);
    };
    auto evictCheck = [&](std::vector<Shape> const& in, int32_t window) {
        CallDims c;
        return checkEvictShapes(in.data(), evict::kNB_INPUTS, {1, window, 0.f}, kDTYPE_HALF, c);
    };
    std::vector<Shape> const ain = attentionInputs(d), ein = evictInputs(d, false);
    // Any window with the same page count fits; one page more or less does not.
    for (int32_t window : {33, 40, 48}) {
        CHECK(attention(ain, window).empty(), "attention window %d: %s", window, attention(ain, window).c_str());
        CHECK(evictCheck(ein, window).empty(), "evict window %d: %s", window, evictCheck(ein, window).c_str());
    }
    for (int32_t window : {0, 32, 49, 1000}) {
        std::string const a = attention(ain, window), e = evictCheck(ein, window);
        std::string const want = "window " + std::to_string(window) + ", block_size 16";
        CHECK(contains(a, "KvzapVarlenPagedAttention: ring_table has shape [2, 2, 2, 3], expected [L, S, H, "
                          "ceil(window / block_size)]") &&
                  contains(a, want.c_str()),
              "attention window %d: '%s'", window, a.c_str());
        CHECK(contains(e, "KvzapEvict: ring_table has shape [2, 2, 2, 3]") && contains(e, want.c_str()),
              "evict window %d: '%s'", window, e.c_str());
    }
    // ring_table's last dim off: W columns (slots, not pages), or the old [L, S, H, W, D] ring.
    for (Shape ring : {shape({2, 2, 2, 33}), shape({2, 2, 2, 2}), shape({2, 2, 2, 4}), shape({2, 2, 2, 33, 64})}) {
        std::vector<Shape> a = ain, e = ein;
        a[attn::kRING_TABLE] = ring;
        e[evict::kRING_TABLE] = ring;
        CHECK(contains(attention(a, 33), "ring_table") && contains(attention(a, 33), "= [2, 2, 2, 3]"), "attention: '%s'",
              attention(a, 33).c_str());
        CHECK(contains(evictCheck(e, 33), "ring_table") && contains(evictCheck(e, 33), "= [2, 2, 2, 3]"), "evict: '%s'",
              evictCheck(e, 33).c_str());
    }
    // Rows with no sequence (B = 0, N > 0): the kernel would read cu_seqlens[1] and seq_slots[0].
    Dims rowsless = d;
    rowsless.B = 0;
    CHECK(contains(attention(attentionInputs(rowsless), 33), "3 rows of q but no sequence in seq_slots"),
          "attention B = 0, N = 3: '%s'", attention(attentionInputs(rowsless), 33).c_str());
    // W = 0: no window pages, ring_table [L, S, H, 0]; one column is refused, as is W = 1 with none.
    Dims none = d;
    none.W = 0;
    std::vector<Shape> const a0 = attentionInputs(none), e0 = evictInputs(none, false);
    CHECK(a0[attn::kRING_TABLE].d[3] == 0 && attention(a0, 0).empty(), "attention W = 0: %s", attention(a0, 0).c_str());
    CHECK(evictCheck(e0, 0).empty(), "evict W = 0: %s", evictCheck(e0, 0).c_str());
    CHECK(contains(attention(a0, 1), "ring_table") && contains(evictCheck(e0, 1), "ring_table"), "W = 1, R = 0");
    CHECK(contains(attention(ain, 0), "ring_table") && contains(evictCheck(ein, 0), "ring_table"), "W = 0, R = 3");
    // Every layer at once (evict layer = -1) checks ring_table the same way.
    std::vector<Shape> all = evictInputs(d, true);
    CallDims c;
    CHECK(checkEvictShapes(all.data(), evict::kNB_INPUTS, {-1, 33, 0.f}, kDTYPE_HALF, c).empty() && c.R == 3 &&
              c.layers == 2,
          "evict all layers");
    CHECK(contains(checkEvictShapes(all.data(), evict::kNB_INPUTS, {-1, 64, 0.f}, kDTYPE_HALF, c), "ring_table"),
          "evict all layers, window 64");
}

void testShapes() {
    // A decode step (one new token for each of 64 sequences) takes the warp-per-head evict kernel,
    // chosen by max_new_tokens == 1; chunked prefill of 3 sequences in 577 rows: up to 575 each.
    CallDims step;
    step.N = step.B = 64;
    CHECK(evictMaxNewTokens(step) == 1, "decode max_new_tokens %lld", (long long)evictMaxNewTokens(step));
    step.N = 577;
    step.B = 3;
    CHECK(evictMaxNewTokens(step) == 575, "prefill max_new_tokens %lld", (long long)evictMaxNewTokens(step));
    for (Dims const& d : kCases) {
        AttentionFields const af = attentionFields(d);
        std::vector<Shape> in = attentionInputs(d);
        CallDims c;
        std::string e = checkAttentionShapes(in.data(), attn::kNB_INPUTS, af, kDTYPE_BF16, c);
        CHECK(e.empty(), "attention N=%lld: %s", (long long)d.N, e.c_str());
        CHECK(c.N == d.N && c.Hq == d.Hq && c.H == d.H && c.D == d.D && c.B == d.B && c.L == d.L && c.S == d.S &&
                  c.M == d.M && c.NB == d.NB && c.BS == d.BS && c.W == d.W && c.R == ringPages(d),
              "resolved dims N=%lld", (long long)d.N);
        CHECK(attentionMaxKeys(c) == d.M * d.BS + d.W + d.N, "max_keys");
        // The max_keys input's length is the step's bound when below the capacity, else the capacity.
        for (int64_t K : {int64_t{1}, d.W + 1, d.M * d.BS + d.W + d.N + 5}) {
            std::vector<Shape> withK = in;
            withK[attn::kMAX_KEYS] = shape({K});
            CallDims ck;
            e = checkAttentionShapes(withK.data(), attn::kNB_INPUTS, af, kDTYPE_BF16, ck);
            CHECK(e.empty() && attentionMaxKeys(ck) == std::min(K, d.M * d.BS + d.W + d.N), "max_keys length %lld: %s",
                  (long long)K, e.c_str());
        }
        if (d.N > 0) {  // a zero-length bound is refused, naming the input
            std::vector<Shape> zero = in;
            zero[attn::kMAX_KEYS] = shape({0});
            CallDims unused;
            e = checkAttentionShapes(zero.data(), attn::kNB_INPUTS, af, kDTYPE_BF16, unused);
            CHECK(contains(e, "max_keys has length 0"), "max_keys of length 0: '%s'", e.c_str());
        }
        std::vector<Shape> const out = outputShapes(attentionIo(), in.data(), attn::kNB_INPUTS);
        CHECK(out.size() == attn::kNB_OUTPUTS && same(out[attn::kOUT], shape({d.N, d.Hq, d.D})), "out shape");
        for (size_t i = 1; i < out.size(); ++i)
            CHECK(same(out[i], in[attentionIo().outputs[i].aliasedInput]), "aliased output %zu shape", i);
        // Any dimension off by one is refused, but block_table's M (it defines M, nothing else has it);
        // a wrong rank is named.
        for (int32_t i = 0; i < attn::kNB_INPUTS; ++i) {
            CallDims unused;
            for (int32_t k = 0; k < in[i].nbDims; ++k) {
                if ((i == attn::kBLOCK_TABLE && k == 3) || i == attn::kMAX_KEYS) continue;  // they define M, K
                std::vector<Shape> bad = in;
                bad[i].d[k] += 1;
                e = checkAttentionShapes(bad.data(), attn::kNB_INPUTS, af, kDTYPE_BF16, unused);
                CHECK(!e.empty(), "attention accepts a wrong %s dim %d", attentionIo().inputs[i].name, k);
            }
            std::vector<Shape> bad = in;
            bad[i].nbDims += 1;
            e = checkAttentionShapes(bad.data(), attn::kNB_INPUTS, af, kDTYPE_BF16, unused);
            CHECK(contains(e, attentionIo().inputs[i].name), "wrong rank of %s: '%s'", attentionIo().inputs[i].name,
                  e.c_str());
        }
        for (bool all : {false, true}) {
            EvictFields const ef = evictFields(d, all ? -1 : static_cast<int32_t>(d.L - 1));
            std::vector<Shape> ein = evictInputs(d, all);
            e = checkEvictShapes(ein.data(), evict::kNB_INPUTS, ef, kDTYPE_HALF, c);
            CHECK(e.empty(), "evict N=%lld all=%d: %s", (long long)d.N, all, e.c_str());
            CHECK(c.layers == (all ? d.L : 1) && c.N == d.N && c.W == d.W && c.R == ringPages(d) && c.NB == d.NB,
                  "evict dims");
            // At least the most new tokens one sequence can have when each has one or more.
            CHECK(evictMaxNewTokens(c) >= (d.B ? d.N - d.B + 1 : d.N) && evictMaxNewTokens(c) <= d.N, "max_new_tokens");
            std::vector<Shape> const eout = outputShapes(evictIo(), ein.data(), evict::kNB_INPUTS);
            for (size_t i = 0; i < eout.size(); ++i)
                CHECK(same(eout[i], ein[evictIo().outputs[i].aliasedInput]), "evict output %zu", i);
            for (int32_t i = 0; i < evict::kNB_INPUTS; ++i)
                for (int32_t k = 0; k < ein[i].nbDims; ++k) {
                    if (i == evict::kBLOCK_TABLE && k == 3) continue;
                    std::vector<Shape> bad = ein;
                    bad[i].d[k] += 1;
                    CallDims unused;
                    e = checkEvictShapes(bad.data(), evict::kNB_INPUTS, ef, kDTYPE_HALF, unused);
                    CHECK(!e.empty(), "evict accepts a wrong %s dim %d", evictIo().inputs[i].name, k);
                }
        }
    }
    // What the kernels are not built for.
    struct Bad {
        Dims d;
        int32_t layer, dtype;
        char const* error;
    };
    std::vector<Bad> const bad{
        {{4, 8, 8, 96, 1, 1, 1, 4, 8, 16, 4}, 0, kDTYPE_HALF, "head_dim must be 64 or 128"},
        {{4, 12, 8, 64, 1, 1, 1, 4, 8, 16, 4}, 0, kDTYPE_HALF, "must divide evenly and be at most 8"},
        {{4, 72, 8, 64, 1, 1, 1, 4, 8, 16, 4}, 0, kDTYPE_HALF, "must divide evenly and be at most 8"},
        {{4, 8, 8, 64, 1, 2, 1, 4, 8, 16, 4}, 2, kDTYPE_HALF, "field 'layer' is 2 but the cache has L = 2"},
        {{4, 8, 8, 64, 1, 1, 1, 4, 8, 16, 4}, 0, kDTYPE_INT32, "q must be float32, float16 or bfloat16"},
        {{4, 8, 8, 64, 1, 1, 1, 4, 8, 0, 4}, 0, kDTYPE_HALF, "block_size"},
        {{4, 8, 8, 64, 1, 1, 1, 1 << 20, 8, 4096, 4}, 0, kDTYPE_HALF, "exceeds the kernels' int range"},
    };
    for (auto const& b : bad) {
        std::vector<Shape> in = attentionInputs(b.d);
        CallDims c;
        std::string const e = checkAttentionShapes(in.data(), attn::kNB_INPUTS, attentionFields(b.d, b.layer), b.dtype, c);
        CHECK(contains(e, b.error), "expected '%s', got '%s'", b.error, e.c_str());
    }
    testRingTable();
    // Evict: 16-byte rows (D = 4 is fine in fp32, not in fp16); k_new's rank must match `layer`.
    Dims const small{3, 4, 4, 4, 1, 2, 1, 2, 8, 4, 4};
    std::vector<Shape> ein = evictInputs(small, false);
    CallDims c;
    CHECK(checkEvictShapes(ein.data(), evict::kNB_INPUTS, evictFields(small, 1), kDTYPE_FLOAT, c).empty(), "D=4 fp32");
    CHECK(contains(checkEvictShapes(ein.data(), evict::kNB_INPUTS, evictFields(small, 1), kDTYPE_HALF, c),
                   "multiple of 16 bytes"),
          "D=4 fp16");
    CHECK(contains(checkEvictShapes(ein.data(), evict::kNB_INPUTS, evictFields(small, -1), kDTYPE_FLOAT, c),
                   "all layers, [L, N, H, D]"),
          "layer -1 with [N, H, D]");
    std::vector<Shape> const allIn = evictInputs(small, true);
    CHECK(contains(checkEvictShapes(allIn.data(), evict::kNB_INPUTS, evictFields(small, 0), kDTYPE_FLOAT, c),
                   "one layer, [N, H, D]"),
          "layer 0 with [L, N, H, D]");
    CHECK(contains(checkEvictShapes(ein.data(), evict::kNB_INPUTS, evictFields(small, 2), kDTYPE_FLOAT, c), "L = 2"),
          "layer >= L");
    CHECK(contains(checkEvictShapes(ein.data(), evict::kNB_INPUTS - 1, evictFields(small, 0), kDTYPE_FLOAT, c),
                   "expected 16 inputs"),
          "count");
    CHECK(contains(checkAttentionShapes(attentionInputs(small).data(), attn::kNB_INPUTS - 1, attentionFields(small),
                                        kDTYPE_FLOAT, c),
                   "expected 13 inputs"),
          "attention count");
    std::vector<Shape> unresolved = ein;
    unresolved[evict::kK_NEW].d[0] = -1;
    CHECK(contains(checkEvictShapes(unresolved.data(), evict::kNB_INPUTS, evictFields(small, 0), kDTYPE_FLOAT, c),
                   "unresolved"),
          "wildcard");
}

// ---------------------------------------------------------------- split and workspace

void testWorkspace() {
    for (int dtype : {KVZAP_FLOAT32, KVZAP_FLOAT16, KVZAP_BFLOAT16})
        for (int g = 1; g <= 8; ++g)
            for (int sm : {70, 75, 80, 86, 89, 90, 100, 120})
                CHECK(kvzapAttentionBlocksPerSm(dtype, g, sm) <= kMAX_BLOCKS_PER_SM, "dtype=%d G=%d sm=%d", dtype, g, sm);
    int checked = 0;
    // B = N: decode (one block per row); B < N: packed row groups in bf16 / fp16 (one sequence, or
    // about two tokens each).
    for (int64_t N : {1, 2, 7, 64, 577, 4096})
        for (int64_t B : {int64_t{1}, (N + 1) / 2, N})
        for (auto hq_h : std::vector<std::pair<int64_t, int64_t>>{{32, 8}, {9, 3}, {4, 4}, {56, 7}})
            for (int64_t D : {64, 128})
                for (auto m_bs : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {64, 16}, {2048, 16}, {300, 24}})
                    for (int64_t W : {0, 128})
                        for (int sms : {1, 80, 108, 132, 256, 5000})
                            for (int sm : {80, 90})
                            for (int dtype : {KVZAP_FLOAT32, KVZAP_BFLOAT16}) {
                                CallDims d;
                                d.N = N, d.B = B, d.Hq = hq_h.first, d.H = hq_h.second, d.D = D, d.M = m_bs.first,
                                d.BS = m_bs.second, d.W = W;
                                int const keys = static_cast<int>(attentionMaxKeys(d));
                                int const split = attentionSplit(d, dtype, sms, sm);
                                int const want = kvzapAttentionSplitSize(dtype, int(N), int(B), int(d.Hq), int(d.H),
                                                                         keys, sms < kMAX_SMS ? sms : kMAX_SMS, sm);
                                CHECK(split == want && split >= 256 && split <= kMAX_SPLIT, "split %d vs %d", split,
                                      want);
                                size_t const need = attentionWorkspaceBytes(d, split);
                                CHECK(need == kvzapAttentionWorkspaceBytes(int(N), int(d.Hq), int(D), keys, split),
                                      "workspace bytes");
                                size_t const bound = attentionWorkspaceBound(d);
                                CHECK(need <= bound, "N=%lld B=%lld Hq=%lld D=%lld keys=%d sms=%d: need %zu > bound %zu",
                                      (long long)N, (long long)B, (long long)d.Hq, (long long)D, keys, sms, need, bound);
                                // Fewer rows or keys never need more than the bound of the larger call.
                                CallDims fewer = d;
                                fewer.N = N / 2 + 1;
                                fewer.B = std::min(B, fewer.N);
                                fewer.M = d.M / 3;
                                CHECK(attentionWorkspaceBound(fewer) <= bound, "bound not monotone");
                                CHECK(attentionWorkspaceBytes(fewer, attentionSplit(fewer, dtype, sms, sm)) <= bound,
                                      "smaller call needs more");
                                ++checked;
                            }
    CHECK(checked > 1000, "%d cases", checked);

    // getWorkspaceSize over a profile covers every shape inside it.
    Dims const lo{1, 32, 8, 128, 1, 36, 64, 2048, 100000, 16, 128}, hi{8192, 32, 8, 128, 64, 36, 64, 2048, 100000, 16, 128};
    std::vector<Shape> const minIn = attentionInputs(lo), maxIn = attentionInputs(hi);
    size_t const profile = attentionProfileWorkspace(minIn.data(), maxIn.data(), attn::kNB_INPUTS, attentionFields(hi));
    for (int64_t N : {1, 3, 64, 100, 1000, 8192})
    for (int64_t B : {int64_t{1}, std::min<int64_t>(N, 64)}) {
        Dims mid = hi;
        mid.N = N, mid.B = B;
        std::vector<Shape> in = attentionInputs(mid);
        CallDims c;
        CHECK(checkAttentionShapes(in.data(), attn::kNB_INPUTS, attentionFields(mid), kDTYPE_BF16, c).empty(),
              "profile shape");
        for (int sms : {108, 132, 148})
            CHECK(attentionWorkspaceBytes(c, attentionSplit(c, KVZAP_BFLOAT16, sms, 90)) <= profile, "N=%lld beyond the profile's %zu",
                  (long long)N, profile);
        // A step's own key bound (the max_keys input's length) never needs more than the profile's.
        for (int64_t K : {int64_t{1}, int64_t{300}, int64_t{5000}, int64_t{40000}}) {
            in[attn::kMAX_KEYS] = shape({K});
            CHECK(checkAttentionShapes(in.data(), attn::kNB_INPUTS, attentionFields(mid), kDTYPE_BF16, c).empty(),
                  "profile shape, K = %lld", (long long)K);
            CHECK(attentionWorkspaceBytes(c, attentionSplit(c, KVZAP_BFLOAT16, 132, 90)) <= profile,
                  "N=%lld K=%lld beyond the profile's %zu", (long long)N, (long long)K, profile);
        }
    }
    CHECK(attentionProfileWorkspace(minIn.data(), maxIn.data(), attn::kNB_INPUTS - 1, attentionFields(hi)) == 0,
          "wrong input count");
    // W comes from the field: a longer window (its ring_table too) bounds more keys.
    Dims wide = hi;
    wide.W = 1 << 20;
    std::vector<Shape> const wideIn = attentionInputs(wide);
    CallDims wc;
    CHECK(checkAttentionShapes(wideIn.data(), attn::kNB_INPUTS, attentionFields(wide), kDTYPE_BF16, wc).empty(),
          "wide window");
    size_t const wideProfile =
        attentionProfileWorkspace(minIn.data(), wideIn.data(), attn::kNB_INPUTS, attentionFields(wide));
    CHECK(wideProfile > profile && attentionWorkspaceBytes(wc, attentionSplit(wc, KVZAP_BFLOAT16, 132, 90)) <= wideProfile,
          "profile bound with W = %d: %zu (W = 128: %zu)", 1 << 20, wideProfile, profile);
    // The numbers the README quotes (bf16 Qwen3-8B-like: Hq 32, H 8, D 128, M*BS = 32768, W = 128).
    CallDims q;
    q.Hq = 32, q.H = 8, q.D = 128, q.M = 2048, q.BS = 16, q.W = 128;
    for (int64_t N : {64, 8192}) {
        q.N = N;
        std::printf("workspace bound N=%lld: %zu bytes\n", (long long)N, attentionWorkspaceBound(q));
    }
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::printf("usage: %s fields|io|shapes|workspace\n", argv[0]);
        return 2;
    }
    std::string const what = argv[1];
    if (what == "fields") testFields();
    else if (what == "io") testIo();
    else if (what == "shapes") testShapes();
    else if (what == "workspace") testWorkspace();
    else return 2;
    std::printf("%s: %d checks, %d failed\n", what.c_str(), gChecks, gFailures);
    return gFailures ? 1 : 0;
}
