# Runs blockd's QAPI generator (schema/qapigen) at build time and builds its output.
#
#   include(cmake/qapigen.cmake)
#   blockd_qapigen(blockd_qapi)
#
# defines the STATIC library target named by the argument (blockd_qapi) from the generated
# sources in ${CMAKE_BINARY_DIR}/generated/qapi/.  Consumers include "qapi/types.h",
# "qapi/visit.h", "qapi/commands.h", "qapi/events.h" and "qapi/introspect.h".  The library
# links nlohmann_json and blockd_runtime (which the caller must define before linking happens).
# The generated commands.cc calls the hand-written qmp_<command>() handlers and events.cc
# includes "qmp/event_bus.h", so whatever links blockd_qapi must provide both.

set(BLOCKD_QAPIGEN_ROOT "${CMAKE_CURRENT_LIST_DIR}/.." CACHE INTERNAL "blockd source root for qapigen")

function(blockd_qapigen TARGET_NAME)
  find_package(Python3 3.9 REQUIRED COMPONENTS Interpreter)
  find_package(nlohmann_json 3 REQUIRED)

  set(root "${BLOCKD_QAPIGEN_ROOT}")
  set(out_dir "${CMAKE_BINARY_DIR}/generated/qapi")
  file(GLOB schema_files CONFIGURE_DEPENDS "${root}/schema/*.json")
  file(GLOB generator_files CONFIGURE_DEPENDS
       "${root}/schema/qapigen/*.py" "${root}/schema/qapigen/cpp/*")

  set(outputs)
  foreach(name types visit commands events introspect runtime)
    list(APPEND outputs "${out_dir}/${name}.h" "${out_dir}/${name}.cc")
  endforeach()

  # The generator rewrites only files whose content changed; the stamp tells make/ninja the
  # step ran, so an unchanged header does not force recompiling its users.
  set(stamp "${out_dir}/qapigen.stamp")
  add_custom_command(
    OUTPUT "${stamp}" ${outputs}
    COMMAND ${CMAKE_COMMAND} -E env "PYTHONPATH=${root}/schema"
            "${Python3_EXECUTABLE}" -m qapigen
            --schema "${root}/schema/blockd.json"
            --implemented "${root}/schema/implemented.json"
            --out "${out_dir}"
            --stamp "${stamp}"
    DEPENDS ${schema_files} ${generator_files}
    WORKING_DIRECTORY "${root}"
    COMMENT "Generating QAPI marshalling from schema/blockd.json"
    VERBATIM)

  set(sources)
  foreach(name types visit commands events introspect runtime)
    list(APPEND sources "${out_dir}/${name}.cc")
  endforeach()
  # Users of the generated headers depend on this target so that generation runs before they
  # compile (a link dependency alone does not order compilation).
  add_custom_target(${TARGET_NAME}_generate DEPENDS "${stamp}")
  add_library(${TARGET_NAME} STATIC ${sources})
  add_dependencies(${TARGET_NAME} ${TARGET_NAME}_generate)
  target_include_directories(${TARGET_NAME} PUBLIC
    "${CMAKE_BINARY_DIR}/generated"
    "${root}/cpp")
  target_compile_features(${TARGET_NAME} PUBLIC cxx_std_20)
  target_link_libraries(${TARGET_NAME} PUBLIC nlohmann_json::nlohmann_json blockd_runtime)
endfunction()
