// blockd._core: the pybind11 module. Thin by design: it converts arguments, releases the GIL
// around every call that may block, and turns C++ errors into Python exceptions in one place
// (raise_status). Logic lives in C++ (cpp/qmp) or in the Python package.
#include <pybind11/eval.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <memory>
#include <optional>

#include "qmp/engine.h"
#include "qmp/keyval.h"

namespace py = pybind11;
using blockd::Status;
using blockd::qmp::Engine;
using blockd::qmp::Monitor;

namespace {

py::object error_type;  // blockd._core.Error

[[noreturn]] void raise_status(const Status& status) {
  py::object error =
      error_type(std::string(blockd::error_class_name(status.error_class())), status.message());
  PyErr_SetObject(error_type.ptr(), error.ptr());
  throw py::error_already_set();
}

std::chrono::milliseconds to_millis(double seconds) {
  if (seconds < 0) seconds = 0;
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000.0));
}

void bind_engine(py::module_& module) {
  py::class_<Monitor>(module, "Monitor")
      .def("greeting", &Monitor::greeting)
      .def(
          "feed",
          [](Monitor& monitor, py::bytes data) {
            std::string bytes = data;
            py::gil_scoped_release release;
            return monitor.feed(bytes);
          },
          py::arg("data"))
      .def("take_events", &Monitor::take_events)
      .def("event_fd", &Monitor::event_fd)
      .def("wants_close", &Monitor::wants_close)
      .def("close", [](Monitor& monitor) {
        py::gil_scoped_release release;
        monitor.close();
      });

  py::class_<Engine>(module, "Engine")
      .def(py::init([] {
        auto engine = Engine::create();
        if (!engine) raise_status(engine.status());
        return std::move(engine).value();
      }))
      .def(
          "execute",
          [](Engine& engine, const std::string& request) {
            py::gil_scoped_release release;
            return engine.execute(request);
          },
          py::arg("request"))
      .def(
          "cli_option",
          [](Engine& engine, const std::string& kind, const std::string& options, bool keyval) {
            Status status;
            {
              py::gil_scoped_release release;
              auto parsed = nlohmann::json::parse(options, nullptr, false);
              status = parsed.is_discarded()
                           ? Status::generic("Invalid JSON in option '" + kind + "'")
                           : engine.cli_option(kind, parsed, keyval);
            }
            if (!status) raise_status(status);
          },
          py::arg("kind"), py::arg("options"), py::arg("keyval"))
      .def("open_monitor",
           [](Engine& engine) {
             py::gil_scoped_release release;
             return engine.open_monitor();
           })
      .def(
          "next_event",
          [](Engine& engine, double timeout) {
            py::gil_scoped_release release;
            return engine.next_event(to_millis(timeout));
          },
          py::arg("timeout"))
      .def(
          "wait_shutdown",
          [](Engine& engine, std::optional<double> timeout) {
            py::gil_scoped_release release;
            std::optional<std::chrono::milliseconds> wait;
            if (timeout) wait = to_millis(*timeout);
            return engine.wait_shutdown(wait);
          },
          py::arg("timeout") = py::none())
      // Test hooks (not part of the public API): drive the clock of the event rate limiting.
      .def("_test_manual_event_clock",
           [](Engine& engine) { engine.events().TEST_use_manual_clock(); })
      .def(
          "_test_advance_event_clock",
          [](Engine& engine, double seconds) {
            py::gil_scoped_release release;
            engine.events().TEST_advance_clock(
                std::chrono::nanoseconds(static_cast<int64_t>(seconds * 1e9)));
          },
          py::arg("seconds"))
      .def("shutdown", [](Engine& engine) {
        py::gil_scoped_release release;
        engine.shutdown();
      });
}

void bind_keyval(py::module_& module) {
  module.def(
      "keyval_parse",
      [](const std::string& text, std::optional<std::string> implied_key) {
        auto parsed = blockd::qmp::keyval_parse(text, implied_key);
        if (!parsed) throw py::value_error(parsed.status().message());
        return parsed->dump();
      },
      py::arg("text"), py::arg("implied_key") = py::none());
}

}  // namespace

PYBIND11_MODULE(_core, module) {
  module.doc() = "blockd's compiled engine; use the blockd package instead of this module.";
  // The error type is defined in Python so that it carries error_class and desc attributes.
  py::dict scope;
  scope["__builtins__"] = py::module_::import("builtins");
  scope["__name__"] = "blockd._core";
  py::exec(R"(
class Error(Exception):
    """An error reported by the blockd engine: a QMP error class and description."""

    def __init__(self, error_class, desc):
        super().__init__(f"{error_class}: {desc}")
        self.error_class = error_class
        self.desc = desc
)",
           scope);
  error_type = scope["Error"];
  error_type.attr("__module__") = "blockd._core";
  module.attr("Error") = error_type;
  bind_engine(module);
  bind_keyval(module);
}
