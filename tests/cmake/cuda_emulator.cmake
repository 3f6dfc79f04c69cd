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
#
# NCCL: with NCCL and MPI found, the emulator also defines the NCCL entry points
# (tests/cuda_emulator/nccl_api.cc): each process of an mpirun job is one emulated device and
# collectives run over MPI, so the multi-rank CUDA paths (tests/cmake/tp_cuda.cmake) run too.
if(DMSRT_HAVE_CUDA)
  file(GLOB CUDA_EMULATOR_SRC CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/tests/cuda_emulator/*.cc)
  set(DMSRT_EMULATED_NCCL OFF)
  if(DMSRT_NCCL_LIB AND DMSRT_HAVE_MPI)
    set(DMSRT_EMULATED_NCCL ON)
  else()
    list(REMOVE_ITEM CUDA_EMULATOR_SRC ${PROJECT_SOURCE_DIR}/tests/cuda_emulator/nccl_api.cc)
  endif()
  add_library(dmsrt_cuda_emulator OBJECT ${CUDA_EMULATOR_SRC})
  target_include_directories(dmsrt_cuda_emulator PUBLIC ${PROJECT_SOURCE_DIR})
  target_include_directories(dmsrt_cuda_emulator SYSTEM PUBLIC ${CUDAToolkit_INCLUDE_DIRS})
  target_link_libraries(dmsrt_cuda_emulator PUBLIC dmsrt_kernels)
  if(DMSRT_EMULATED_NCCL)
    target_link_libraries(dmsrt_cuda_emulator PUBLIC MPI::MPI_C)
  endif()

  add_executable(cuda_backend_emulated_test ${CMAKE_CURRENT_SOURCE_DIR}/gpu/cuda_backend_test.cc)
  target_link_libraries(cuda_backend_emulated_test PRIVATE dmsrt_cuda_emulator dmsrt_runtime
                        GTest::gtest GTest::gtest_main)
  target_compile_definitions(cuda_backend_emulated_test PRIVATE DMSRT_SOURCE_DIR="${PROJECT_SOURCE_DIR}")
  set_target_properties(cuda_backend_emulated_test PROPERTIES RUNTIME_OUTPUT_DIRECTORY
                        ${PROJECT_BINARY_DIR}/tests)
  add_test(NAME cuda_backend_emulated_test COMMAND cuda_backend_emulated_test)
  set_tests_properties(cuda_backend_emulated_test PROPERTIES LABELS unit TIMEOUT 900)

  # Tiny model files for the file-model cases of the same test (and of the GPU test): Qwen2
  # Q/K/V biases with a biased Variant B adapter, and Qwen3 with an unbiased one. head_dim 64,
  # the smallest the CUDA attention kernels take.
  find_package(Python3 COMPONENTS Interpreter)
  if(Python3_Interpreter_FOUND)
    set(cuda_models ${PROJECT_BINARY_DIR}/tests/cuda_models)
    set(cuda_model_args --format hf --layers 2 --hidden 128 --ffn 192 --heads 4 --kv-heads 2
        --head-dim 64 --dms-window 4 --dms-variant B)
    add_test(NAME cuda_make_models_qwen2
             COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tests/fixtures/make_tiny_model.py
                     --out ${cuda_models}/qwen2_bias_dmsB --arch qwen2 --seed 5 ${cuda_model_args})
    add_test(NAME cuda_make_models_qwen3
             COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tests/fixtures/make_tiny_model.py
                     --out ${cuda_models}/qwen3_dmsB --arch qwen3 --seed 6 ${cuda_model_args})
    set_tests_properties(cuda_make_models_qwen2 cuda_make_models_qwen3 PROPERTIES
                         LABELS "unit;gpu" TIMEOUT 60 FIXTURES_SETUP cuda_models)
    foreach(t cuda_backend_emulated_test cuda_backend_test)
      set_tests_properties(${t} PROPERTIES FIXTURES_REQUIRED cuda_models
                           ENVIRONMENT DMSRT_CUDA_TEST_MODELS=${cuda_models})
    endforeach()
  endif()
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
  # tova on the device: the attention weights per slot come back each step and the index picks
  # the victims; the 37-token prompt runs token by token. The CPU backend answers the same text
  # with the same figures (2160 resident of 3780 logical tokens at 24 per head).
  add_test(NAME cuda_emulated_generate_tova
           COMMAND dmsrt_cuda_emulated generate --backend cuda
                   --model ${PROJECT_SOURCE_DIR}/models/SmolLM2-135M-Instruct.Q4_1.gguf
                   --chat "What is the capital of France?" --max-tokens 6 --kv-policy tova
                   --kv-tokens 24)
  set_tests_properties(cuda_emulated_generate_tova PROPERTIES LABELS unit TIMEOUT 300
                       PASS_REGULAR_EXPRESSION "Paris.*\\[cuda\\] prompt 37 tokens, generated 6 tokens.*KV \\[tova\\]: [0-9.]+ KiB held, 2160 resident / 3780 logical"
                       FAIL_REGULAR_EXPRESSION "${emu_fail}")
  # Host-only mode at full size: a Qwen3-8B-shaped model on an emulated 80 GB device, the host
  # time of a decode step next to the device floor (tests/bench/host_step_bench.py), and a decode
  # step that waits for the device once under every policy (dms included: its bits are deferred).
  if(Python3_Interpreter_FOUND)
    add_test(NAME cuda_emulated_host_step
             COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tests/bench/host_step_bench.py
                     --binary $<TARGET_FILE:dmsrt_cuda_emulated> --batch 8 --context 4096 --steps 2
                     --max-waits-per-step 1)
    set_tests_properties(cuda_emulated_host_step PROPERTIES LABELS unit TIMEOUT 300
                         PASS_REGULAR_EXPRESSION "forced +8 +4096 +[0-9.]+ +[0-9.]+ +[0-9.]+"
                         FAIL_REGULAR_EXPRESSION "${emu_fail}|failed|did not run")
  endif()
endif()
