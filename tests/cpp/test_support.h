// Helpers shared by the GoogleTest suites: a loop, running a task to completion on it,
// and temporary files.
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include "runtime/loop.h"
#include "runtime/task.h"

namespace blockd::testing {

inline std::unique_ptr<Loop> make_loop() {
  auto loop = Loop::create(64);
  EXPECT_TRUE(loop.has_value());
  return std::move(loop).value();
}

// Runs `task` on `loop` until it finishes and returns its result. Deterministic: the loop only
// blocks in the kernel while the task waits for I/O.
template <typename T>
T run(Loop& loop, Task<T> task) {
  std::optional<T> result;
  bool finished = false;
  loop.spawn([](Task<T> inner, std::optional<T>& out, bool& done) -> Task<void> {
    out = co_await std::move(inner);
    done = true;
  }(std::move(task), result, finished));
  loop.run_until([&] { return finished; });
  return std::move(*result);
}

inline void run(Loop& loop, Task<void> task) {
  bool finished = false;
  loop.spawn([](Task<void> inner, bool& done) -> Task<void> {
    co_await std::move(inner);
    done = true;
  }(std::move(task), finished));
  loop.run_until([&] { return finished; });
}

// A private directory, by default under /var/tmp (a disk file system: O_DIRECT, holes and OFD
// locks work), removed with its contents at the end of the test.
class TempDir {
 public:
  explicit TempDir(const std::string& parent = "/var/tmp") {
    std::string name = parent + "/blockd-test-XXXXXX";
    if (mkdtemp(name.data()) == nullptr) ADD_FAILURE() << "mkdtemp in " << parent << " failed";
    path_ = name;
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

}  // namespace blockd::testing
