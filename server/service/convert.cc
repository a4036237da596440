#include "server/service/convert.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "google/protobuf/util/time_util.h"

namespace icecache {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

v1::DType ToProto(DType dtype) {
  switch (dtype) {
    case DType::kBF16:
      return v1::DTYPE_BF16;
    case DType::kFP16:
      return v1::DTYPE_FP16;
  }
  return v1::DTYPE_UNSPECIFIED;
}

absl::Status TailFromProto(const v1::SequenceGeometry& proto, GeometrySpec* spec);

absl::StatusOr<GeometrySpec> FromProto(const v1::SequenceGeometry& proto) {
  GeometrySpec spec;
  spec.num_layers = proto.num_layers();
  spec.num_q_heads = proto.num_q_heads();
  spec.num_kv_heads = proto.num_kv_heads();
  spec.head_dim = proto.head_dim();
  switch (proto.dtype()) {
    case v1::DTYPE_BF16:
      spec.dtype = DType::kBF16;
      break;
    case v1::DTYPE_FP16:
      spec.dtype = DType::kFP16;
      break;
    default:
      break;
  }
  spec.max_tokens = proto.max_tokens();
  if (proto.has_page_size()) spec.page_size = proto.page_size();
  if (proto.has_budget_tokens()) spec.budget_tokens = proto.budget_tokens();
  if (proto.has_sink_tokens()) spec.sink_tokens = proto.sink_tokens();
  if (proto.has_window_tokens()) spec.window_tokens = proto.window_tokens();
  if (proto.has_full_kv_layers()) spec.full_kv_layers = proto.full_kv_layers();
  if (proto.has_softmax_scale()) spec.softmax_scale = proto.softmax_scale();
  absl::Status tail = TailFromProto(proto, &spec);
  if (!tail.ok()) return tail;
  return spec;
}

absl::Status TailFromProto(const v1::SequenceGeometry& proto, GeometrySpec* spec) {
  switch (proto.tail_estimate()) {
    case v1::TAIL_ESTIMATE_UNSPECIFIED:
      return absl::OkStatus();
    case v1::TAIL_ESTIMATE_NONE:
      spec->tail = selection::TailMode::kNone;
      return absl::OkStatus();
    case v1::TAIL_ESTIMATE_MEAN:
      spec->tail = selection::TailMode::kMean;
      return absl::OkStatus();
    case v1::TAIL_ESTIMATE_MEAN_VAR:
      spec->tail = selection::TailMode::kMeanVariance;
      return absl::OkStatus();
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "geometry.tail_estimate must be NONE, MEAN or MEAN_VAR, got ", proto.tail_estimate()));
  }
}

v1::TailEstimate ToProto(selection::TailMode mode) {
  switch (mode) {
    case selection::TailMode::kNone:
      return v1::TAIL_ESTIMATE_NONE;
    case selection::TailMode::kMean:
      return v1::TAIL_ESTIMATE_MEAN;
    case selection::TailMode::kMeanVariance:
      return v1::TAIL_ESTIMATE_MEAN_VAR;
  }
  return v1::TAIL_ESTIMATE_UNSPECIFIED;
}

void ToProto(const Geometry& g, v1::SequenceGeometry* proto) {
  proto->set_num_layers(g.num_layers);
  proto->set_num_q_heads(g.num_q_heads);
  proto->set_num_kv_heads(g.num_kv_heads);
  proto->set_head_dim(g.head_dim);
  proto->set_dtype(ToProto(g.dtype));
  proto->set_max_tokens(g.max_tokens);
  proto->set_page_size(g.page_size);
  proto->set_budget_tokens(g.budget_tokens);
  proto->set_sink_tokens(g.sink_tokens);
  proto->set_window_tokens(g.window_tokens);
  proto->set_full_kv_layers(g.full_kv_layers);
  proto->set_tail_estimate(ToProto(g.tail));
  proto->set_softmax_scale(g.softmax_scale);
}

void ToProto(const SequenceInfo& info, v1::Sequence* proto) {
  proto->set_handle(info.handle);
  ToProto(info.geometry, proto->mutable_geometry());
  proto->set_label(info.label);
  proto->set_kv_bytes(info.kv_bytes);
  proto->set_num_tokens(info.num_tokens);
  *proto->mutable_create_time() =
      google::protobuf::util::TimeUtil::NanosecondsToTimestamp(absl::ToUnixNanos(info.create_time));
}

}  // namespace icecache
