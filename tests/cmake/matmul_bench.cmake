# Decode matmuls of the default model's shape (tests/bench/matmul_bench.cc): step time of the
# layer products and the output head, bytes/s and multiply-adds/s against the read-bandwidth floor.
add_executable(matmul_bench ${CMAKE_CURRENT_SOURCE_DIR}/bench/matmul_bench.cc)
target_link_libraries(matmul_bench PRIVATE dmsrt_runtime)
set_target_properties(matmul_bench PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/tests)
add_test(NAME matmul_bench_smoke COMMAND matmul_bench --layers 2 --reps 3)
set_tests_properties(matmul_bench_smoke PROPERTIES LABELS bench TIMEOUT 120)
