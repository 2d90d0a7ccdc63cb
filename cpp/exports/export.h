// Block exports: the ways clients outside the process reach a node (NBD today; FUSE,
// vhost-user-blk and VDUSE later), and the registry of them by id.
//
// Threads: everything here runs on the main loop.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/task.h"

namespace blockd::exports {

// One export, as block-export-add creates it and query-block-exports lists it.
class Export {
 public:
  Export(std::string id, std::string node_name)
      : id_(std::move(id)), node_name_(std::move(node_name)) {}
  virtual ~Export() = default;
  Export(const Export&) = delete;
  Export& operator=(const Export&) = delete;

  const std::string& id() const noexcept { return id_; }
  const std::string& node_name() const noexcept { return node_name_; }
  // The BlockExportType spelling ("nbd").
  virtual std::string_view type_name() const noexcept = 0;
  // True once removal has started (query-block-exports "shutting-down").
  bool shutting_down() const noexcept { return shutting_down_; }

  // Clients currently using the export (block-export-del mode=safe refuses while nonzero).
  virtual size_t client_count() const noexcept = 0;

  // Stops the export: new clients can no longer reach it, connected clients are dropped, their
  // requests are drained and the node is released. Completes when the export is really gone.
  // Main loop; call at most once.
  virtual Task<void> shut_down() = 0;

 protected:
  void set_shutting_down() noexcept { shutting_down_ = true; }

 private:
  std::string id_;
  std::string node_name_;
  bool shutting_down_ = false;
};

}  // namespace blockd::exports
