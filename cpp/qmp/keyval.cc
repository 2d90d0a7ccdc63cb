#include "qmp/keyval.h"

#include <algorithm>
#include <cctype>
#include <map>
#include <string>
#include <vector>

namespace blockd::qmp {
namespace {

bool valid_fragment(std::string_view fragment) {
  if (fragment.empty()) return false;
  for (char c : fragment) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_') return false;
  }
  return true;
}

// A tree of keyval parameters before lists are recognised. `children` keeps insertion order
// through `order`.
struct Tree {
  bool is_leaf = false;
  std::string value;
  std::map<std::string, Tree> children;
  std::vector<std::string> order;
};

Status insert(Tree& root, const std::vector<std::string>& path, std::string value) {
  Tree* node = &root;
  std::string prefix;
  for (size_t i = 0; i < path.size(); ++i) {
    const std::string& fragment = path[i];
    if (!prefix.empty()) prefix += '.';
    prefix += fragment;
    auto [it, inserted] = node->children.try_emplace(fragment);
    if (inserted) node->order.push_back(fragment);
    Tree& child = it->second;
    const bool last = i + 1 == path.size();
    if (last) {
      if (!inserted && !child.is_leaf) {
        return Status::generic("Parameters '" + prefix + ".*' used inconsistently");
      }
      child.is_leaf = true;
      child.value = std::move(value);
    } else {
      if (child.is_leaf)
        return Status::generic("Parameters '" + prefix + ".*' used inconsistently");
      node = &child;
    }
  }
  return Status::ok();
}

bool is_index(const std::string& key) {
  return !key.empty() && std::all_of(key.begin(), key.end(), [](char c) {
    return std::isdigit(static_cast<unsigned char>(c));
  });
}

Expected<nlohmann::json> to_json(const Tree& tree, const std::string& prefix) {
  if (tree.is_leaf) return nlohmann::json(tree.value);
  bool all_indexes = !tree.order.empty();
  for (const auto& key : tree.order) all_indexes = all_indexes && is_index(key);
  if (all_indexes) {
    std::map<unsigned long, const Tree*> items;
    for (const auto& key : tree.order) {
      if (key.size() > 9) return Status::generic("Parameter '" + prefix + key + "' is too large");
      items[std::stoul(key)] = &tree.children.at(key);
    }
    nlohmann::json list = nlohmann::json::array();
    unsigned long expected = 0;
    for (const auto& [index, child] : items) {
      if (index != expected) {
        return Status::generic("Parameter '" + prefix + std::to_string(expected) + "' missing");
      }
      auto value = to_json(*child, prefix + std::to_string(index) + ".");
      if (!value) return value;
      list.push_back(std::move(value).value());
      ++expected;
    }
    return list;
  }
  nlohmann::json object = nlohmann::json::object();
  for (const auto& key : tree.order) {
    auto value = to_json(tree.children.at(key), prefix + key + ".");
    if (!value) return value;
    object[key] = std::move(value).value();
  }
  return object;
}

}  // namespace

Expected<nlohmann::json> keyval_parse(std::string_view text,
                                      std::optional<std::string_view> implied_key) {
  Tree root;
  size_t pos = 0;
  bool first = true;
  while (pos < text.size()) {
    // The key runs to the first '=' or ','.
    size_t key_end = pos;
    while (key_end < text.size() && text[key_end] != '=' && text[key_end] != ',') ++key_end;
    std::string key;
    const bool has_equals = key_end < text.size() && text[key_end] == '=';
    size_t value_start;
    if (has_equals) {
      key = std::string(text.substr(pos, key_end - pos));
      value_start = key_end + 1;
    } else if (first && implied_key) {
      key = std::string(*implied_key);
      value_start = pos;
    } else {
      return Status::generic("Expected '=' after parameter '" +
                             std::string(text.substr(pos, key_end - pos)) + "'");
    }
    // The value runs to the first single ','; ",," stands for a literal comma.
    std::string value;
    size_t i = value_start;
    for (; i < text.size(); ++i) {
      if (text[i] == ',') {
        if (i + 1 < text.size() && text[i + 1] == ',') {
          value.push_back(',');
          ++i;
          continue;
        }
        break;
      }
      value.push_back(text[i]);
    }
    std::vector<std::string> path;
    size_t start = 0;
    for (;;) {
      size_t dot = key.find('.', start);
      path.push_back(key.substr(start, dot == std::string::npos ? std::string::npos : dot - start));
      if (dot == std::string::npos) break;
      start = dot + 1;
    }
    for (const auto& fragment : path) {
      if (!valid_fragment(fragment)) return Status::generic("Invalid parameter '" + key + "'");
    }
    BLOCKD_RETURN_IF_ERROR(insert(root, path, std::move(value)));
    first = false;
    pos = i + 1;
  }
  return to_json(root, "");
}

}  // namespace blockd::qmp
