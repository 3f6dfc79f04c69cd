# The CUDA backend on an emulated device (tests/cuda_emulator/emulator.h), label unit: the same
# test source as the GPU test tests/gpu/cuda_backend_test.cc, so the backend's host side (step
# layout, staging, stream order, KV data movement) is checked against the CPU backend on every
# machine that has the CUDA headers, GPU or not.
#
# Linking: the emulator's objects define the CUDA runtime, cuBLAS and kernel-launcher symbols
# that dmsrt_runtime's CUDA backend calls. Object files come first on the link line, so the
# linker takes those definitions and extracts nothing for them from dmsrt_kernels_cuda (a
# forgotten launcher shows up as a duplicate-symbol error, not as a silent mix) and binds no
# call of the backend to libcudart or libcublas.
if(DMSRT_HAVE_CUDA)
  file(GLOB CUDA_EMULATOR_SRC CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/tests/cuda_emulator/*.cc)
  add_library(dmsrt_cuda_emulator OBJECT ${CUDA_EMULATOR_SRC})
  target_include_directories(dmsrt_cuda_emulator PUBLIC ${PROJECT_SOURCE_DIR})
  target_include_directories(dmsrt_cuda_emulator SYSTEM PUBLIC ${CUDAToolkit_INCLUDE_DIRS})
  target_link_libraries(dmsrt_cuda_emulator PUBLIC dmsrt_kernels)

  add_executable(cuda_backend_emulated_test ${CMAKE_CURRENT_SOURCE_DIR}/gpu/cuda_backend_test.cc)
  target_link_libraries(cuda_backend_emulated_test PRIVATE dmsrt_cuda_emulator dmsrt_runtime
                        GTest::gtest GTest::gtest_main)
  target_compile_definitions(cuda_backend_emulated_test PRIVATE DMSRT_SOURCE_DIR="${PROJECT_SOURCE_DIR}")
  set_target_properties(cuda_backend_emulated_test PROPERTIES RUNTIME_OUTPUT_DIRECTORY
                        ${PROJECT_BINARY_DIR}/tests)
  add_test(NAME cuda_backend_emulated_test COMMAND cuda_backend_emulated_test)
  set_tests_properties(cuda_backend_emulated_test PROPERTIES LABELS unit TIMEOUT 900)
endif()

# The dmsrt binary on the emulated device: bench-decode's and generate's CUDA paths end to end
# (engine, scheduler, sampling on the device) on a tiny synthetic model and on the default model.
if(DMSRT_HAVE_CUDA)
  add_executable(dmsrt_cuda_emulated ${PROJECT_SOURCE_DIR}/launch/main.cc)
  target_link_libraries(dmsrt_cuda_emulated PRIVATE dmsrt_cuda_emulator dmsrt_launch)
  set_target_properties(dmsrt_cuda_emulated PROPERTIES RUNTIME_OUTPUT_DIRECTORY
                        ${PROJECT_BINARY_DIR}/tests)
  set(emu_fail "cuda emulator: fault|INTERNAL|dmsrt [a-z-]+: ")
  # A pool that holds 8 x 512 tokens only under forced eviction: the dense cell must report
  # "no", the compressed one must run.
  set(emu_bench bench-decode --backend cuda --synthetic tiny-llama --batch 2,8 --context 128,512
      --steps 3 --dms-force-rate 0.875 --dms-window 16 --kv-budget 2MiB)
  add_test(NAME cuda_emulated_bench_decode_none
           COMMAND dmsrt_cuda_emulated ${emu_bench} --kv-policy none)
  set_tests_properties(cuda_emulated_bench_decode_none PROPERTIES LABELS unit TIMEOUT 300
                       PASS_REGULAR_EXPRESSION "2 +512 +yes +[0-9.]+.*\n +8 +512 +no"
                       FAIL_REGULAR_EXPRESSION "${emu_fail}")
  add_test(NAME cuda_emulated_bench_decode_forced
           COMMAND dmsrt_cuda_emulated ${emu_bench} --kv-policy forced)
  set_tests_properties(cuda_emulated_bench_decode_forced PROPERTIES LABELS unit TIMEOUT 300
                       PASS_REGULAR_EXPRESSION "8 +512 +yes +[0-9.]+ +[0-9.]+ +[0-9.]+ +[4-8]\\."
                       FAIL_REGULAR_EXPRESSION "${emu_fail}")
  add_test(NAME cuda_emulated_generate
           COMMAND dmsrt_cuda_emulated generate --backend cuda
                   --model ${PROJECT_SOURCE_DIR}/models/SmolLM2-135M-Instruct.Q4_1.gguf
                   --chat "What is the capital of France?" --max-tokens 6)
  set_tests_properties(cuda_emulated_generate PROPERTIES LABELS unit TIMEOUT 300
                       PASS_REGULAR_EXPRESSION "\\[cuda\\] prompt 37 tokens, generated [1-6] tokens"
                       FAIL_REGULAR_EXPRESSION "${emu_fail}")
endif()
