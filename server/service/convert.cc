#include "server/service/convert.h"

#include <string>

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

GeometrySpec FromProto(const v1::SequenceGeometry& proto) {
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
  return spec;
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
