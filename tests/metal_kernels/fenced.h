// A copy of an input placed against an inaccessible page (PROT_NONE), for the
// harness adaptors' out-of-bounds read checks: a kernel that reads one byte past
// the end (where = 1) or before the start (where = 2) of the buffer, even a byte
// whose value it then discards, kills the process. The harness's guard bytes see
// only writes and reads whose values reach an output; the tests that fence
// inputs run in a subprocess (tests/test_metal_quantized_head.py).
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstring>

#include "metal_host.h"

namespace mkp {

class Fenced {
 public:
  Fenced(const void* src, std::size_t bytes, int where) {
    const std::size_t page = std::size_t(sysconf(_SC_PAGESIZE));
    const std::size_t data_pages = (bytes + page - 1) / page + 1;
    size_ = (data_pages + 2) * page;
    void* m = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw mh::Error("mmap failed");
    base_ = static_cast<char*>(m);
    mprotect(base_, page, PROT_NONE);
    mprotect(base_ + (data_pages + 1) * page, page, PROT_NONE);
    char* first = base_ + page;
    char* end = base_ + (data_pages + 1) * page;
    data_ = where == 1 ? end - bytes : first;
    std::memcpy(data_, src, bytes);
  }
  Fenced(const Fenced&) = delete;
  Fenced& operator=(const Fenced&) = delete;
  ~Fenced() {
    munmap(base_, size_);
  }
  const void* data() const {
    return data_;
  }

 private:
  char* base_ = nullptr;
  char* data_ = nullptr;
  std::size_t size_ = 0;
};

} // namespace mkp
