#include "server/index/dci_page_table.h"

#include "common/populate.h"
#include "server/index/headroom.h"

namespace icecache {

uint32_t DciPageTable::AddNode() {
  node_first_.push_back(kNone);
  node_last_.push_back(kNone);
  node_num_pages_.push_back(0);
  node_tokens_.push_back(0);
  return static_cast<uint32_t>(node_first_.size() - 1);
}

uint32_t DciPageTable::NewPage(uint32_t node) {
  const uint32_t page = static_cast<uint32_t>(page_fill_.size());
  page_fill_.push_back(0);
  page_node_.push_back(node);
  page_next_.push_back(kNone);
  ReserveGeometric(&positions_, positions_.size() + page_tokens_);
  positions_.resize(positions_.size() + page_tokens_, -1);
  if (node_last_[node] == kNone) {
    node_first_[node] = page;
  } else {
    page_next_[node_last_[node]] = page;
  }
  node_last_[node] = page;
  ++node_num_pages_[node];
  return page;
}

Placement DciPageTable::Append(uint32_t node, int32_t position) {
  uint32_t page = node_last_[node];
  if (page == kNone || page_fill_[page] >= static_cast<uint32_t>(page_tokens_)) {
    page = NewPage(node);
  }
  const uint32_t slot = page_fill_[page]++;
  positions_[static_cast<size_t>(page) * page_tokens_ + slot] = position;
  ++node_tokens_[node];
  if (static_cast<int64_t>(page_of_position_.size()) <= position) {
    ReserveGeometric(&page_of_position_, static_cast<size_t>(position) + 1);
    page_of_position_.resize(position + 1, kNone);
  }
  page_of_position_[position] = page;
  return Placement{page, slot};
}

void DciPageTable::AppendBulk(uint32_t node, const int32_t* positions, int count) {
  for (int i = 0; i < count; ++i) {
    uint32_t page = node_last_[node];
    if (page == kNone || page_fill_[page] >= static_cast<uint32_t>(page_tokens_)) {
      page = NewPage(node);
    }
    const uint32_t slot = page_fill_[page]++;
    positions_[static_cast<size_t>(page) * page_tokens_ + slot] = positions[i];
    ++node_tokens_[node];
  }
}

bool DciPageTable::FinishBulk(int64_t n, std::vector<Placement>* placements) {
  AssignPopulated(&page_of_position_, static_cast<size_t>(n), kNone);
  AssignPopulated(placements, static_cast<size_t>(n), Placement{});
  for (uint32_t page = 0; page < num_pages(); ++page) {
    const int32_t* pos = positions(page);
    for (uint32_t s = 0; s < page_fill_[page]; ++s) {
      if (pos[s] < 0 || pos[s] >= n || page_of_position_[pos[s]] != kNone) return false;
      page_of_position_[pos[s]] = page;
      (*placements)[pos[s]] = Placement{page, s};
    }
  }
  for (int64_t p = 0; p < n; ++p) {
    if (page_of_position_[p] == kNone) return false;
  }
  return true;
}

void DciPageTable::Reserve(size_t nodes, size_t pages, size_t tokens) {
  for (auto* v : {&node_first_, &node_last_, &node_num_pages_, &node_tokens_}) v->reserve(nodes);
  for (auto* v : {&page_fill_, &page_node_, &page_next_}) v->reserve(pages);
  positions_.reserve(pages * page_tokens_);
  page_of_position_.reserve(tokens);
}

double DciPageTable::MeanFill() const {
  if (page_fill_.empty()) return 0.0;
  return static_cast<double>(num_tokens()) /
         (static_cast<double>(page_fill_.size()) * page_tokens_);
}

size_t DciPageTable::bytes() const {
  return (node_first_.size() + node_last_.size() + node_num_pages_.size() + node_tokens_.size() +
          page_fill_.size() + page_node_.size() + page_next_.size() + page_of_position_.size()) *
             sizeof(uint32_t) +
         positions_.size() * sizeof(int32_t);
}

}  // namespace icecache
