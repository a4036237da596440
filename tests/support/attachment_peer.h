// Test access to what the Attachment keeps private: raw submission-queue entries, to send the
// daemon references to slots that are not submitted or do not exist.
#pragma once

#include <cstdint>

#include "icecache/attachment.h"

namespace icecache {

class AttachmentTestPeer {
 public:
  static void SubmitRaw(Attachment& a, uint32_t queue_entry) { a.SubmitRaw(queue_entry); }
};

}  // namespace icecache
