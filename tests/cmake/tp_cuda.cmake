# Tensor parallelism of the CUDA backend on the emulated device (label mpi): every rank of a real
# mpirun is one emulated GPU (DMSRT_CUDA_EMULATOR_DEVICES gives each node as many GPUs as ranks,
# so each rank must take the device of its local rank) and NCCL runs over MPI
# (tests/cuda_emulator/nccl_api.cc). Registered when the emulator carries NCCL
# (tests/cmake/cuda_emulator.cmake: CUDA headers, NCCL and MPI found).
#
#   nccl_emulated_np{2,3}       NcclComm's collectives, split, stream binding, watchdog
#   tp_cuda_backend_np{2,4}     the backend at TP 2 and 4 against the single-device CUDA backend
#                               and the CPU backend (logits, greedy tokens, resident sets)
#   tp_cuda_cli                 generate and bench-decode --backend cuda --tp 2 under mpirun
#                               against --tp 1, and a degree that does not divide the KV heads
#                               and a rank that fails (injected error, device fault, NCCL error,
#                               a stuck collective, a killed or stalled rank) stops its group
#                               with a line naming a rank and the cause, within the timeout
#   tp_cuda_host_only_tp8       Llama-3.1-70B shapes at TP 8 in host-only mode
#   tp_cuda_*_gpu*              the same on real GPUs (label gpu_tp, launch/gpu_check.sh)

if(NOT DMSRT_EMULATED_NCCL)
  return()
endif()
find_program(DMSRT_TPC_MPIEXEC NAMES mpiexec mpirun HINTS ${MPIEXEC_EXECUTABLE})
if(MPIEXEC_EXECUTABLE)
  set(DMSRT_TPC_MPIEXEC ${MPIEXEC_EXECUTABLE})
endif()
if(NOT DMSRT_TPC_MPIEXEC)
  message(STATUS "dmsrt: mpiexec not found; CUDA tensor-parallel tests not registered")
  return()
endif()
find_package(Python3 COMPONENTS Interpreter)
execute_process(COMMAND ${DMSRT_TPC_MPIEXEC} --version OUTPUT_VARIABLE dmsrt_tpc_version ERROR_QUIET)
set(DMSRT_TPC_FLAGS "")
if(dmsrt_tpc_version MATCHES "Open MPI|OpenRTE")
  set(DMSRT_TPC_FLAGS --allow-run-as-root --oversubscribe)
endif()
set(DMSRT_TPC_ENV OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_mpi_yield_when_idle=1)
set(DMSRT_TPC_MODELS ${PROJECT_BINARY_DIR}/tests/tp_cuda_models)
set(DMSRT_TPC_MAKE ${PROJECT_SOURCE_DIR}/tests/fixtures/make_tiny_model.py)

# ---- tiny models with head_dim 64 (the CUDA attention kernels' smallest) --------------------------
if(Python3_Interpreter_FOUND)
  set(tpc_common --layers 2 --hidden 128 --head-dim 64)
  add_test(NAME tp_cuda_make_models_llama
           COMMAND ${Python3_EXECUTABLE} ${DMSRT_TPC_MAKE} --out ${DMSRT_TPC_MODELS}/llama_kv4
                   --arch llama --format hf --heads 8 --kv-heads 4 --ffn 192 --seed 11 ${tpc_common})
  add_test(NAME tp_cuda_make_models_qwen3
           COMMAND ${Python3_EXECUTABLE} ${DMSRT_TPC_MAKE} --out ${DMSRT_TPC_MODELS}/qwen3_kv8
                   --arch qwen3 --format gguf --quant f16 --heads 8 --kv-heads 8 --ffn 160
                   --vocab 275 --seed 12 ${tpc_common})
  add_test(NAME tp_cuda_make_models_dmsA
           COMMAND ${Python3_EXECUTABLE} ${DMSRT_TPC_MAKE} --out ${DMSRT_TPC_MODELS}/llama_dmsA_kv4
                   --arch llama --format hf --heads 8 --kv-heads 4 --ffn 192 --seed 13
                   --dms-window 4 --dms-variant A ${tpc_common})
  add_test(NAME tp_cuda_make_models_dmsB
           COMMAND ${Python3_EXECUTABLE} ${DMSRT_TPC_MAKE} --out ${DMSRT_TPC_MODELS}/qwen2_dmsB_kv4
                   --arch qwen2 --format hf --heads 8 --kv-heads 4 --ffn 192 --seed 15
                   --dms-window 4 --dms-variant B ${tpc_common})
  add_test(NAME tp_cuda_make_models_dmsA_layer
           COMMAND ${Python3_EXECUTABLE} ${DMSRT_TPC_MAKE} --out ${DMSRT_TPC_MODELS}/llama_dmsAL_kv4
                   --arch llama --format hf --heads 8 --kv-heads 4 --ffn 192 --seed 14
                   --dms-window 4 --dms-variant A --dms-per layer ${tpc_common})
  # Llama-3.1's RoPE scaling with a short original context, so that most channels are scaled.
  add_test(NAME tp_cuda_make_models_rope3
           COMMAND ${Python3_EXECUTABLE} ${DMSRT_TPC_MAKE} --out ${DMSRT_TPC_MODELS}/llama_rope3_kv4
                   --arch llama --format hf --heads 8 --kv-heads 4 --ffn 192 --seed 16
                   --rope-scaling llama3 --rope-factor 8 --rope-orig-ctx 64 ${tpc_common})
  set_tests_properties(tp_cuda_make_models_llama tp_cuda_make_models_qwen3 tp_cuda_make_models_dmsA
                       tp_cuda_make_models_dmsB tp_cuda_make_models_rope3
                       tp_cuda_make_models_dmsA_layer
                       PROPERTIES LABELS mpi TIMEOUT 60 FIXTURES_SETUP tp_cuda_models)
endif()

# dmsrt_tpc_gtest(<name> <source>): a gtest binary on the emulated device with its own main.
function(dmsrt_tpc_gtest name src)
  add_executable(${name} ${src})
  target_link_libraries(${name} PRIVATE dmsrt_cuda_emulator dmsrt_runtime GTest::gtest)
  set_target_properties(${name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/tests)
endfunction()

# dmsrt_tpc_run(<test> <np> <timeout> <command...>): under mpirun with np emulated devices.
function(dmsrt_tpc_run test np timeout)
  add_test(NAME ${test} COMMAND ${DMSRT_TPC_MPIEXEC} ${DMSRT_TPC_FLAGS} -np ${np} ${ARGN})
  set_tests_properties(${test} PROPERTIES LABELS mpi TIMEOUT ${timeout} PROCESSORS ${np}
                       ENVIRONMENT "${DMSRT_TPC_ENV};DMSRT_CUDA_EMULATOR_DEVICES=${np};DMSRT_TP_CUDA_MODELS=${DMSRT_TPC_MODELS}")
endfunction()

dmsrt_tpc_gtest(nccl_emulated_test ${CMAKE_CURRENT_SOURCE_DIR}/mpi/nccl_emulated_test.cc)
foreach(np 2 3)
  dmsrt_tpc_run(nccl_emulated_np${np} ${np} 90 $<TARGET_FILE:nccl_emulated_test>)
endforeach()

dmsrt_tpc_gtest(tp_cuda_backend_test ${CMAKE_CURRENT_SOURCE_DIR}/mpi/tp_cuda_backend_test.cc)
foreach(np 2 4)
  dmsrt_tpc_run(tp_cuda_backend_emulated_np${np} ${np} 300 $<TARGET_FILE:tp_cuda_backend_test>)
  set_tests_properties(tp_cuda_backend_emulated_np${np} PROPERTIES FIXTURES_REQUIRED tp_cuda_models)
endforeach()
add_test(NAME tp_cuda_backend_without_mpirun COMMAND tp_cuda_backend_test)
set_tests_properties(tp_cuda_backend_without_mpirun PROPERTIES LABELS mpi TIMEOUT 30
                     PASS_REGULAR_EXPRESSION "SKIPPED")

# The same test on real GPUs (label gpu_tp: launch/gpu_check.sh runs it where there are two or
# more; with fewer devices than ranks it prints SKIPPED and passes).
add_executable(tp_cuda_backend_gpu_test ${CMAKE_CURRENT_SOURCE_DIR}/mpi/tp_cuda_backend_test.cc)
target_link_libraries(tp_cuda_backend_gpu_test PRIVATE dmsrt_runtime GTest::gtest)
set_target_properties(tp_cuda_backend_gpu_test PROPERTIES RUNTIME_OUTPUT_DIRECTORY
                      ${PROJECT_BINARY_DIR}/tests)
foreach(np 2 4 8)
  add_test(NAME tp_cuda_backend_gpu_np${np}
           COMMAND ${DMSRT_TPC_MPIEXEC} ${DMSRT_TPC_FLAGS} -np ${np} $<TARGET_FILE:tp_cuda_backend_gpu_test>)
  set_tests_properties(tp_cuda_backend_gpu_np${np} PROPERTIES LABELS gpu_tp TIMEOUT 600
                       PROCESSORS ${np} FIXTURES_REQUIRED tp_cuda_models
                       ENVIRONMENT "${DMSRT_TPC_ENV};DMSRT_TP_CUDA_MODELS=${DMSRT_TPC_MODELS}")
endforeach()

# ---- the dmsrt binary on emulated devices --------------------------------------------------------
# Full-size shapes at TP 8 in the emulator's host-only mode (device memory is address space, work
# is counted, not run): Llama-3.1-70B's layers sharded over 8 emulated 80 GB devices, a decode
# cell of 32 x 4096 tokens, so that the shard sizes, pools and collectives of the largest degree
# are exercised on every machine.
dmsrt_tpc_run(tp_cuda_host_only_tp8 8 120 $<TARGET_FILE:dmsrt_cuda_emulated> bench-decode
              --backend cuda --tp 8 --synthetic llama-3.1-70b:layers=2 --batch 32 --context 4096
              --steps 2 --kv-budget 1GiB --kv-policy forced)
set_tests_properties(tp_cuda_host_only_tp8 PROPERTIES
                     ENVIRONMENT "${DMSRT_TPC_ENV};DMSRT_CUDA_EMULATOR_DEVICES=8;DMSRT_CUDA_EMULATOR_HOST_ONLY=1;DMSRT_CUDA_EMULATOR_MIB=81920"
                     PASS_REGULAR_EXPRESSION "tp 8 .*\n +32 +4096 +yes"
                     FAIL_REGULAR_EXPRESSION "cuda emulator: fault|failed")

if(Python3_Interpreter_FOUND)
  string(REPLACE ";" " " dmsrt_tpc_flags_str "${DMSRT_TPC_FLAGS}")
  add_test(NAME tp_cuda_cli_emulated
           COMMAND ${Python3_EXECUTABLE} -m pytest -q -s -p no:cacheprovider
                   ${CMAKE_CURRENT_SOURCE_DIR}/mpi/test_tp_cuda_cli.py)
  set_tests_properties(tp_cuda_cli_emulated PROPERTIES LABELS mpi TIMEOUT 600 PROCESSORS 2
    FIXTURES_REQUIRED tp_cuda_models
    ENVIRONMENT "${DMSRT_TPC_ENV};DMSRT_EMU_BIN=$<TARGET_FILE:dmsrt_cuda_emulated>;DMSRT_MPIEXEC=${DMSRT_TPC_MPIEXEC};DMSRT_MPI_FLAGS=${dmsrt_tpc_flags_str};DMSRT_TP_CUDA_MODELS=${DMSRT_TPC_MODELS}")
  # The same commands with build/bin/dmsrt on two real GPUs (label gpu_tp), without the cases
  # that inject faults through the emulator.
  add_test(NAME tp_cuda_cli_gpu
           COMMAND ${Python3_EXECUTABLE} -m pytest -q -s -p no:cacheprovider
                   ${CMAKE_CURRENT_SOURCE_DIR}/mpi/test_tp_cuda_cli.py -k "not device_fault and not nccl_")
  set_tests_properties(tp_cuda_cli_gpu PROPERTIES LABELS gpu_tp TIMEOUT 900 PROCESSORS 2
    FIXTURES_REQUIRED tp_cuda_models
    ENVIRONMENT "${DMSRT_TPC_ENV};DMSRT_EMU_BIN=$<TARGET_FILE:dmsrt>;DMSRT_REAL_GPUS=1;DMSRT_MPIEXEC=${DMSRT_TPC_MPIEXEC};DMSRT_MPI_FLAGS=${dmsrt_tpc_flags_str};DMSRT_TP_CUDA_MODELS=${DMSRT_TPC_MODELS}")
endif()
