// defines: is_bnb4bit_checkpoint and bnb4bit_weight (bitsandbytes 4-bit HF checkpoints read in place)
#include "src/io/bnb4bit.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>
#include <vector>

#include "kernels/cpu/ref/quantize.h"
#include "src/core/error.h"

namespace tf::io {

namespace {

using nlohmann::json;

// A quant_state is a few hundred bytes of JSON; anything far larger is not one.
constexpr size_t kMaxQuantStateBytes = 64 * 1024;

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

struct Companions {
  const SafetensorsModel& model;
  const std::string& name;

  const SafetensorsTensor& get(const std::string& suffix) const {
    const SafetensorsTensor* t = model.find(name + suffix);
    TF_CHECK(t, model.source(), ": tensor ", name,
             " is a bitsandbytes 4-bit weight but its companion tensor ", name, suffix, " is missing");
    return *t;
  }
  const SafetensorsTensor& get(const std::string& suffix, StDType dtype,
                               const std::vector<int64_t>& shape) const {
    const SafetensorsTensor& t = get(suffix);
    TF_CHECK(t.dtype == dtype && t.shape == shape, model.source(), ": tensor ", t.name, " has dtype ",
             st_dtype_name(t.dtype), " and shape ", t.shape_str(), ", expected ", st_dtype_name(dtype), " ",
             shape_str(shape), " for the [", rows, ", ", cols, "] weight ", name);
    return t;
  }
  int64_t rows, cols;
};

// The JSON field `key` of a quant_state, which must exist.
const json& field(const json& j, const char* key, const std::string& where) {
  auto it = j.find(key);
  TF_CHECK(it != j.end(), where, " has no \"", key, "\"");
  return *it;
}

void expect_int(const json& j, const char* key, int64_t want, const std::string& where) {
  const json& v = field(j, key, where);
  TF_CHECK(v.is_number_integer() && v.get<int64_t>() == want, where, ": \"", key, "\" is ", v.dump(),
           ", expected ", want, " (the only value tightfit reads)");
}

void expect_string(const json& j, const char* key, const char* want, const std::string& where) {
  const json& v = field(j, key, where);
  TF_CHECK(v.is_string() && v.get<std::string>() == want, where, ": \"", key, "\" is ", v.dump(),
           ", expected \"", want, "\"");
}

}  // namespace

bool is_bnb4bit_checkpoint(const json& config, const std::string& source) {
  auto it = config.find("quantization_config");
  if (it == config.end() || it->is_null()) return false;
  const json& q = *it;
  const std::string where = source + ": quantization_config";
  TF_CHECK(q.is_object(), where, " must be an object, got ", q.dump());
  auto str = [&](const char* key) -> std::string {
    auto v = q.find(key);
    if (v == q.end() || v->is_null()) return {};
    TF_CHECK(v->is_string(), where, ".", key, " must be a string, got ", v->dump());
    return v->get<std::string>();
  };
  auto flag = [&](const char* key) {
    auto v = q.find(key);
    if (v == q.end() || v->is_null()) return false;
    TF_CHECK(v->is_boolean(), where, ".", key, " must be true or false, got ", v->dump());
    return v->get<bool>();
  };
  const std::string method = str("quant_method");
  TF_CHECK(method == "bitsandbytes", where, ".quant_method is \"", method,
           "\"; tightfit reads only bitsandbytes 4-bit (nf4) quantized checkpoints");
  TF_CHECK(!flag("load_in_8bit"), where,
           ": 8-bit bitsandbytes (LLM.int8) checkpoints are not supported; tightfit reads 4-bit nf4 ones");
  TF_CHECK(flag("load_in_4bit"), where,
           ".load_in_4bit is not true; tightfit reads only 4-bit nf4 checkpoints");
  const std::string type = str("bnb_4bit_quant_type");
  TF_CHECK(type == "nf4", where, ".bnb_4bit_quant_type is \"", type.empty() ? "fp4 (its default)" : type,
           "\"; tightfit reads nf4 4-bit weights only");
  const std::string storage = str("bnb_4bit_quant_storage");
  TF_CHECK(storage.empty() || storage == "uint8", where, ".bnb_4bit_quant_storage is \"", storage,
           "\"; tightfit reads 4-bit codes stored as uint8 only");
  return true;
}

WeightRef bnb4bit_weight(const SafetensorsModel& model, const std::string& name, int64_t rows, int64_t cols) {
  const std::string& src = model.source();
  TF_CHECK(!model.find(name + ".quant_state.bitsandbytes__fp4"), src, ": tensor ", name,
           " is a bitsandbytes fp4 weight; tightfit reads nf4 4-bit weights only");
  const int64_t n = rows * cols;
  const int64_t blocks = ref::quant_blocks(n, kNf4Block);
  const Companions c{model, name, rows, cols};

  const SafetensorsTensor& state = c.get(".quant_state.bitsandbytes__nf4");
  const std::string where = src + ": tensor " + state.name;
  TF_CHECK(state.dtype == StDType::U8 && state.shape.size() == 1, where, " has dtype ",
           st_dtype_name(state.dtype), " and shape ", state.shape_str(), ", expected U8 bytes of JSON");
  TF_CHECK(state.bytes.size() <= kMaxQuantStateBytes, where, " is ", state.bytes.size(),
           " bytes, more than the ", kMaxQuantStateBytes, " a quant_state JSON can plausibly be");
  const auto* text = reinterpret_cast<const char*>(state.bytes.data());
  const json qs = json::parse(text, text + state.bytes.size(), nullptr, false);
  TF_CHECK(!qs.is_discarded() && qs.is_object(), where, " is not a JSON object");
  expect_string(qs, "quant_type", "nf4", where);
  expect_int(qs, "blocksize", kNf4Block, where);
  const json& shape = field(qs, "shape", where);
  TF_CHECK(shape.is_array() && shape.size() == 2 && shape[0].is_number_integer() &&
               shape[1].is_number_integer() && shape[0].get<int64_t>() == rows &&
               shape[1].get<int64_t>() == cols,
           where, ": \"shape\" is ", shape.dump(), ", but the model config makes ", name, " [", rows, ", ",
           cols, "]");

  const SafetensorsTensor& codes = c.get("", StDType::U8, {ref::nf4_packed_bytes(n), 1});
  const SafetensorsTensor& qmap = c.get(".quant_map", StDType::F32, {16});
  TF_CHECK(std::memcmp(qmap.bytes.data(), kNf4Code, sizeof kNf4Code) == 0, src, ": tensor ", qmap.name,
           " is not the NF4 codebook tightfit computes with (bitsandbytes' get_4bit_type(\"nf4\"))");

  const SafetensorsTensor& absmax = c.get(".absmax");
  WeightRef w{codes.bytes.data(), DType::NF4, rows, cols};
  if (absmax.dtype == StDType::F32) {
    c.get(".absmax", StDType::F32, {blocks});
    TF_CHECK(!model.find(name + ".nested_absmax"), src, ": tensor ", absmax.name, " is f32 but ", name,
             ".nested_absmax exists: the absmax of a double-quantized weight are uint8 codes");
    w.scales.absmax = model.view(absmax.name).data;
    return w;
  }
  c.get(".absmax", StDType::U8, {blocks});
  c.get(".nested_absmax", StDType::F32, {ref::quant_blocks(blocks, kNf4NestedBlock)});
  const SafetensorsTensor& nmap = c.get(".nested_quant_map", StDType::F32, {256});
  TF_CHECK(std::memcmp(nmap.bytes.data(), ref::dynamic_map(), 256 * sizeof(float)) == 0, src, ": tensor ",
           nmap.name,
           " is not the signed dynamic map tightfit computes with (bitsandbytes' "
           "create_dynamic_map(signed=True))");
  expect_int(qs, "nested_blocksize", kNf4NestedBlock, where);
  expect_string(qs, "nested_dtype", "float32", where);
  const json& offset = field(qs, "nested_offset", where);
  TF_CHECK(offset.is_number() && std::isfinite(offset.get<float>()), where, ": \"nested_offset\" is ",
           offset.dump(), ", expected a finite f32 number");
  w.scales.absmax = absmax.bytes.data();
  w.scales.nested = static_cast<const float*>(model.view(name + ".nested_absmax").data);
  w.scales.offset = offset.get<float>();
  return w;
}

WeightRef bnb4bit_rows(const WeightRef& whole, int64_t row0, int64_t rows, LlamaWeights& w,
                       const std::string& name) {
  TF_CHECK(whole.dtype == DType::NF4 && row0 >= 0 && rows > 0 && row0 + rows <= whole.rows,
           "bnb4bit_rows: rows [", row0, ", ", row0 + rows, ") of the ", dtype_name(whole.dtype), " [",
           whole.rows, ", ", whole.cols, "] weight ", name);
  const int64_t first = row0 * whole.cols;
  TF_CHECK(first % kNf4Block == 0, name, ": the bitsandbytes 4-bit weight of fused projections [", whole.rows,
           ", ", whole.cols, "] is cut into its projections at row ", row0, ", element ", first,
           ", inside one of its ", kNf4Block,
           "-element blocks, whose absmax two projections would share; load the model's float checkpoint "
           "with --quant nf4 instead");
  const int64_t block0 = first / kNf4Block;
  const int64_t blocks = ref::quant_blocks(rows * whole.cols, kNf4Block);
  WeightRef r{static_cast<const uint8_t*>(whole.data) + first / 2, DType::NF4, rows, whole.cols};
  const QuantScales& s = whole.scales;
  if (!s.nested) {
    r.scales.absmax = static_cast<const float*>(s.absmax) + block0;
    return r;
  }
  if (block0 % kNf4NestedBlock == 0) {
    r.scales = {static_cast<const uint8_t*>(s.absmax) + block0, s.nested + block0 / kNf4NestedBlock,
                s.offset};
    return r;
  }
  Tensor absmax(DType::F32, {blocks}, MemTag::Weights, name + ".absmax");
  // Decoded from the first group the rows touch, so that each value sits where its group's scale does.
  const int64_t group0 = block0 / kNf4NestedBlock * kNf4NestedBlock;
  std::vector<float> decoded(size_t(block0 - group0 + blocks));
  ref::dequantize_double_absmax(static_cast<const uint8_t*>(s.absmax) + group0,
                                s.nested + group0 / kNf4NestedBlock, s.offset, int64_t(decoded.size()),
                                decoded.data());
  std::copy(decoded.begin() + (block0 - group0), decoded.end(), absmax.as<float>());
  r.scales.absmax = absmax.view.data;
  w.owned.push_back(std::move(absmax));
  return r;
}

}  // namespace tf::io
