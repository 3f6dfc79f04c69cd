# The KV-store benchmark (tests/bench/kv_bench.cc): KV bytes held and decode attention time per
# token against context length for none / window / forced (synthetic DMS). Registered as a quick
# smoke test with tiny sizes (label bench); run it by hand with the defaults for the full table.
add_executable(kv_bench ${CMAKE_CURRENT_SOURCE_DIR}/bench/kv_bench.cc)
target_link_libraries(kv_bench PRIVATE dmsrt_runtime)
find_package(nlohmann_json QUIET)
if(nlohmann_json_FOUND)
  target_link_libraries(kv_bench PRIVATE nlohmann_json::nlohmann_json)
endif()
set_target_properties(kv_bench PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/tests)
add_test(NAME kv_bench_smoke COMMAND kv_bench --min_context=64 --max_context=256 --steps=3)
set_tests_properties(kv_bench_smoke PROPERTIES LABELS bench TIMEOUT 120)
