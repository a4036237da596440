// eval/ speaks the index's vocabulary: its types are used unqualified in icecache::eval (one
// list here instead of `index::` on every line of the evaluation code).
#pragma once

#include "server/index/dci_tree.h"
#include "server/index/exact_oracle.h"
#include "server/index/kv_index.h"
#include "server/index/rows.h"

namespace icecache::eval {

using index::DciOptions;
using index::DciTree;
using index::ElemBytes;
using index::ElemType;
using index::ElemTypeName;
using index::ExactOracle;
using index::IndexGeometry;
using index::KeyBatch;
using index::kNoPage;
using index::KvIndex;
using index::LayoutChange;
using index::PageFill;
using index::PageInfo;
using index::PageReader;
using index::PageWriter;
using index::RowView;
using index::SelectedPage;
using index::SlotSource;
using index::SlotWrite;

}  // namespace icecache::eval
