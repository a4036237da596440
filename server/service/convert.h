// Translation between the icecache.v1 protobuf messages and the core's domain types, and
// from absl::Status to grpc::Status (the codes are the same numbers).
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "grpcpp/support/status.h"
#include "icecache/v1/icecache.pb.h"
#include "server/core/geometry.h"
#include "server/core/sequence_registry.h"

namespace icecache {

grpc::Status ToGrpcStatus(const absl::Status& status);

// Copies the fields as sent; presence of optional fields is kept. An unknown dtype enum
// value leaves `dtype` empty (ResolveGeometry then reports it).
// INVALID_ARGUMENT for an unknown tail_estimate value (the rest is checked by ResolveGeometry).
absl::StatusOr<GeometrySpec> FromProto(const v1::SequenceGeometry& proto);
// Helper of FromProto: the tail estimate into spec->tail (unset when UNSPECIFIED).
absl::Status TailFromProto(const v1::SequenceGeometry& proto, GeometrySpec* spec);
// Every field set, the optional ones explicitly.
void ToProto(const Geometry& geometry, v1::SequenceGeometry* proto);
void ToProto(const SequenceInfo& info, v1::Sequence* proto);
v1::DType ToProto(DType dtype);
v1::TailEstimate ToProto(selection::TailMode mode);

}  // namespace icecache
