// libFuzzer target: the request ring. One client attached to an in-process data plane (the
// real arena in shared memory, the real dispatcher driven on this thread) writes fuzzed slot
// headers, payloads, staged keys, queue entries and queue tails; every slot it submits must
// be answered, nothing may crash or trip a sanitizer, and the daemon's accounting must come
// back to where it was once the input's sequence is dropped.
#include <fuzzer/FuzzedDataProvider.h>

#include <cstring>
#include <vector>

#include "absl/time/clock.h"
#include "icecache/attachment.h"
#include "server/core/geometry.h"
#include "tests/fuzz/fuzz_support.h"
#include "tests/support/attachment_peer.h"

namespace icecache::fuzz {
namespace {

struct World {
  World() : core(Options()) {
    Attachment::Options o;
    o.socket = core.dir + "/icecached.sock";
    auto a = Attachment::Attach(o);
    auto b = Attachment::Attach(o);
    if (!a.ok() || !b.ok()) ::abort();
    client = std::move(*a);
    other = std::move(*b);
    me = *core.plane->Authenticate(client->token());
    const Caller them = *core.plane->Authenticate(other->token());
    foreign = core.plane->CreateSequence(them, Spec(), "")->handle;
  }
  static DataPlaneOptions Options() {
    DataPlaneOptions o;
    o.dispatcher_threads = false;
    o.arena.slots = 8;
    o.arena.slot_payload = 8192;
    o.arena.page_segment_bytes = 1 << 20;
    o.arena.staging_segment_bytes = 1 << 20;
    o.recall_sample_every = 3;
    o.protocol_error_burst = 1u << 30;  // throttling is not what this target looks at
    return o;
  }
  static GeometrySpec Spec() {
    GeometrySpec g;
    g.num_layers = 2;
    g.num_q_heads = 4;
    g.num_kv_heads = 2;
    g.head_dim = 64;
    g.dtype = DType::kFP16;
    g.max_tokens = 128;
    g.full_kv_layers = 0;
    return g;
  }
  Core core;
  std::unique_ptr<Attachment> client, other;
  Caller me;
  std::string foreign;
};

World& TheWorld() {
  static World* w = new World();
  return *w;
}

void Dispatch(World& w) { w.core.plane->DispatchForTesting(w.client->token()); }

}  // namespace
}  // namespace icecache::fuzz

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace icecache;
  namespace abi = ::icecache::abi;  // not cxxabi.h's ::abi
  fuzz::World& w = fuzz::TheWorld();
  FuzzedDataProvider in(data, size);
  absl::StatusOr<SequenceInfo> seq = w.core.plane->CreateSequence(w.me, fuzz::World::Spec(), "");
  if (!seq.ok()) ::abort();
  const std::string handle = seq->handle;
  std::vector<abi::ArenaRef> staged;
  std::vector<uint32_t> submitted;
  bool lied = false;  // the queue tail was moved by a made-up amount
  auto stage = [&](uint32_t tokens) {
    absl::StatusOr<uint32_t> i = w.client->AcquireSlot();
    if (!i.ok()) return;
    abi::SlotHeader* s = w.client->slot(*i);
    s->op = abi::kOpStage;
    std::memset(s->handle, 0, sizeof(s->handle));
    std::memcpy(s->handle, handle.data(), handle.size());
    s->tokens = tokens;
    s->payload_bytes = 0;
    w.client->Submit(*i);
    for (int pass = 0; pass < 4 && !w.client->Done(*i); ++pass) fuzz::Dispatch(w);
    if (!w.client->Done(*i)) {  // waiting for staging room: answered by the end
      submitted.push_back(*i);
      return;
    }
    abi::StageResponse r{};
    if (w.client->slot(*i)->status == 0) {
      std::memcpy(&r, w.client->payload(*i), sizeof(r));
      staged.push_back(r.buffer);
      absl::StatusOr<uint8_t*> base = w.client->Address(r.buffer, r.bytes);
      if (base.ok()) {
        // Keys and values from the input (fp16 bits: NaN and infinities included).
        const std::vector<uint8_t> bytes = in.ConsumeBytes<uint8_t>(r.bytes);
        if (!bytes.empty()) std::memcpy(*base, bytes.data(), bytes.size());
        std::memset(*base + bytes.size(), 0x3c, r.bytes - bytes.size());
      }
    }
    w.client->ReleaseSlot(*i);
  };
  stage(in.ConsumeIntegralInRange<uint32_t>(1, 128));
  const int actions = in.ConsumeIntegralInRange<int>(0, 12);
  for (int a = 0; a < actions && in.remaining_bytes() > 0; ++a) {
    switch (in.ConsumeIntegralInRange<int>(0, 5)) {
      case 0:
      case 1: {  // a request with fuzzed fields
        absl::StatusOr<uint32_t> i = w.client->AcquireSlot();
        if (!i.ok()) break;
        abi::SlotHeader* s = w.client->slot(*i);
        s->op = in.ConsumeBool() ? in.ConsumeIntegralInRange<uint32_t>(0, 5)
                                 : in.ConsumeIntegral<uint32_t>();
        std::memset(s->handle, 0, sizeof(s->handle));
        switch (in.ConsumeIntegralInRange<int>(0, 2)) {
          case 0:
            std::memcpy(s->handle, handle.data(), handle.size());
            break;
          case 1:
            std::memcpy(s->handle, w.foreign.data(), w.foreign.size());
            break;
          default: {
            const std::string junk = in.ConsumeBytesAsString(sizeof(s->handle));
            std::memcpy(s->handle, junk.data(), junk.size());
          }
        }
        s->layer = in.ConsumeBool() ? in.ConsumeIntegralInRange<uint32_t>(0, 2)
                                    : in.ConsumeIntegral<uint32_t>();
        s->tokens = in.ConsumeBool() ? in.ConsumeIntegralInRange<uint32_t>(0, 130)
                                     : in.ConsumeIntegral<uint32_t>();
        s->k = in.ConsumeIntegralInRange<uint32_t>(0, 5000);
        s->query_dtype = in.ConsumeIntegralInRange<uint32_t>(0, 1);
        s->select_flags = in.ConsumeIntegralInRange<uint32_t>(0, 2);
        if (!staged.empty() && in.ConsumeBool()) {
          s->staging = staged[in.ConsumeIntegralInRange<size_t>(0, staged.size() - 1)];
        } else {
          s->staging =
              abi::ArenaRef{in.ConsumeIntegral<uint32_t>(), 0, in.ConsumeIntegral<uint64_t>()};
        }
        s->first_position = in.ConsumeIntegral<uint32_t>();
        s->payload_bytes = in.ConsumeBool() ? 4 * 64 * 4 + in.ConsumeIntegralInRange<uint32_t>(0, 2)
                                            : in.ConsumeIntegral<uint32_t>();
        const std::vector<uint8_t> payload = in.ConsumeBytes<uint8_t>(
            in.ConsumeIntegralInRange<size_t>(0, w.client->payload_capacity()));
        // No memcpy from an empty vector's null data() (undefined even for 0 bytes).
        if (!payload.empty()) std::memcpy(w.client->payload(*i), payload.data(), payload.size());
        w.client->Submit(*i);
        submitted.push_back(*i);
        break;
      }
      case 2:  // a raw queue entry (a slot that is not submitted, or none at all)
        AttachmentTestPeer::SubmitRaw(*w.client, in.ConsumeIntegral<uint32_t>());
        break;
      case 3:  // a queue tail that lies
        w.client->header()->sq_tail.fetch_add(in.ConsumeIntegral<uint32_t>());
        lied = true;
        break;
      case 4:
        stage(in.ConsumeIntegralInRange<uint32_t>(1, 200));
        break;
      default:
        fuzz::Dispatch(w);
    }
  }
  // Every submitted slot is answered: the sequence is dropped (so that stages waiting for
  // staging room give up), then the queue is drained until nothing is left in flight.
  fuzz::Dispatch(w);
  (void)w.core.registry.Drop(handle, SequenceRegistry::kAnyone);
  // After a lying tail, unanswered requests are expected (below): a short wait only.
  const absl::Time until = absl::Now() + (lied ? absl::Milliseconds(200) : absl::Seconds(20));
  bool all = false;
  while (!all) {
    fuzz::Dispatch(w);
    all = true;
    for (uint32_t i : submitted) all &= w.client->Done(i);
    if (absl::Now() > until) {
      // A tail more than a ring ahead makes the daemon skip to it (a protocol error): the
      // client's own entries not yet taken are never answered. Any other request left
      // unanswered is the daemon's fault.
      if (lied) break;
      ::abort();
    }
  }
  for (uint32_t i : submitted) w.client->ReleaseSlot(i);
  while (w.core.plane->Stats().in_flight > 0) absl::SleepFor(absl::Microseconds(50));
  // Staging buffers no prefill consumed go back (a release needs no sequence).
  for (const abi::ArenaRef& r : staged) {
    absl::StatusOr<uint32_t> i = w.client->AcquireSlot();
    // After a lying tail, slots the daemon skipped are never answered, and a slot released
    // unanswered is not handed out again (Attachment::ReleaseSlot): none may be left.
    if (!i.ok() && lied) break;
    if (!i.ok()) ::abort();
    abi::SlotHeader* s = w.client->slot(*i);
    s->op = abi::kOpRelease;
    s->staging = r;
    s->payload_bytes = 0;
    w.client->Submit(*i);
    while (!w.client->Done(*i)) fuzz::Dispatch(w);
    w.client->ReleaseSlot(*i);
  }
  return 0;
}
