# Tensor parallelism of the CPU runtime (label mpi): the backend against a single rank on tiny f32
# models, the dmsrt subcommands under mpirun on the default model, refusals, and a failing rank.
#
# Included by tests/CMakeLists.txt after (or before) mpi.cmake; reuses mpi.cmake in script mode
# for the tests whose job must fail with a given message.

if(NOT DMSRT_HAVE_MPI)
  return()
endif()
find_program(DMSRT_TP_MPIEXEC NAMES mpiexec mpirun HINTS ${MPIEXEC_EXECUTABLE})
if(MPIEXEC_EXECUTABLE)
  set(DMSRT_TP_MPIEXEC ${MPIEXEC_EXECUTABLE})
endif()
if(NOT DMSRT_TP_MPIEXEC)
  message(STATUS "dmsrt: mpiexec not found; tensor-parallel tests not registered")
  return()
endif()
find_package(Python3 COMPONENTS Interpreter)
execute_process(COMMAND ${DMSRT_TP_MPIEXEC} --version OUTPUT_VARIABLE dmsrt_tp_mpiexec_version
                ERROR_QUIET)
set(DMSRT_TP_MPI_FLAGS "")
if(dmsrt_tp_mpiexec_version MATCHES "Open MPI|OpenRTE")
  set(DMSRT_TP_MPI_FLAGS --allow-run-as-root --oversubscribe)
endif()
set(DMSRT_TP_ENV OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_mpi_yield_when_idle=1)
set(DMSRT_TP_MODELS ${PROJECT_BINARY_DIR}/tests/tp_models)
set(DMSRT_TP_MAKE ${PROJECT_SOURCE_DIR}/tests/fixtures/make_tiny_model.py)
set(DMSRT_TP_MPI_SCRIPT ${CMAKE_CURRENT_LIST_DIR}/mpi.cmake)

# ---- tiny models (fixture) ----------------------------------------------------------------------
if(Python3_Interpreter_FOUND)
  set(tiny_common --layers 2 --hidden 128 --ffn 192)
  add_test(NAME tp_make_models
           COMMAND ${Python3_EXECUTABLE} ${DMSRT_TP_MAKE} --out ${DMSRT_TP_MODELS}/llama_hf_kv4
                   --arch llama --format hf --heads 8 --kv-heads 4 --seed 1 ${tiny_common})
  add_test(NAME tp_make_models_qwen3
           COMMAND ${Python3_EXECUTABLE} ${DMSRT_TP_MAKE} --out ${DMSRT_TP_MODELS}/qwen3_gguf_kv8
                   --arch qwen3 --format gguf --heads 16 --kv-heads 8 --head-dim 16 --vocab 275
                   --seed 2 --layers 2 --hidden 128 --ffn 160)
  add_test(NAME tp_make_models_dmsA
           COMMAND ${Python3_EXECUTABLE} ${DMSRT_TP_MAKE} --out ${DMSRT_TP_MODELS}/llama_dmsA_kv4
                   --arch llama --format hf --heads 8 --kv-heads 4 --seed 3 --dms-window 4
                   --dms-variant A ${tiny_common})
  add_test(NAME tp_make_models_dmsB
           COMMAND ${Python3_EXECUTABLE} ${DMSRT_TP_MAKE} --out ${DMSRT_TP_MODELS}/qwen3_dmsB_kv4
                   --arch qwen3 --format hf --heads 8 --kv-heads 4 --head-dim 16 --seed 4
                   --dms-window 4 --dms-variant B ${tiny_common})
  # One decision per layer, from global KV head 0 (rank 0's): every rank takes rank 0's bits.
  add_test(NAME tp_make_models_dmsA_layer
           COMMAND ${Python3_EXECUTABLE} ${DMSRT_TP_MAKE} --out ${DMSRT_TP_MODELS}/llama_dmsAL_kv4
                   --arch llama --format hf --heads 8 --kv-heads 4 --seed 5 --dms-window 4
                   --dms-variant A --dms-per layer ${tiny_common})
  set_tests_properties(tp_make_models tp_make_models_qwen3 tp_make_models_dmsA tp_make_models_dmsB
                       tp_make_models_dmsA_layer PROPERTIES LABELS mpi TIMEOUT 60 FIXTURES_SETUP tp_models)
endif()

# ---- the backend test (gtest with its own main; every rank runs it) ------------------------------
add_executable(tp_backend_test ${CMAKE_CURRENT_SOURCE_DIR}/mpi/tp_backend_test.cc)
target_link_libraries(tp_backend_test PRIVATE dmsrt_runtime GTest::gtest)
set_target_properties(tp_backend_test PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/tests)
foreach(np 2 4)
  add_test(NAME tp_backend_np${np}
           COMMAND ${DMSRT_TP_MPIEXEC} ${DMSRT_TP_MPI_FLAGS} -np ${np} $<TARGET_FILE:tp_backend_test>)
  set_tests_properties(tp_backend_np${np} PROPERTIES LABELS mpi TIMEOUT 150 PROCESSORS ${np}
                       FIXTURES_REQUIRED tp_models
                       ENVIRONMENT "${DMSRT_TP_ENV};DMSRT_TP_MODELS=${DMSRT_TP_MODELS}")
endforeach()
add_test(NAME tp_backend_without_mpirun COMMAND tp_backend_test)
set_tests_properties(tp_backend_without_mpirun PROPERTIES LABELS mpi TIMEOUT 30
                     PASS_REGULAR_EXPRESSION "SKIPPED")

# ---- the subcommands -----------------------------------------------------------------------------
set(dmsrt_bin $<TARGET_FILE:dmsrt>)

# --tp N without mpirun: a clear error with the command to run (no MPI started).
add_test(NAME tp_cli_needs_mpirun COMMAND ${dmsrt_bin} generate --tp 3 --prompt hi --max-tokens 1)
set_tests_properties(tp_cli_needs_mpirun PROPERTIES LABELS mpi TIMEOUT 30
                     PASS_REGULAR_EXPRESSION "needs 3 processes: launch with mpirun -np 3")

# dmsrt_tp_must_fail(<name> <np> <regex> <env> <args...>): the job must exit non-zero within the
# timeout and print the regex.
function(dmsrt_tp_must_fail name np expect env)
  string(REPLACE ";" "|" cmd
         "${DMSRT_TP_MPIEXEC};${DMSRT_TP_MPI_FLAGS};-np;${np};${dmsrt_bin};${ARGN}")
  add_test(NAME ${name}
           COMMAND ${CMAKE_COMMAND} "-DDMSRT_CMD=${cmd}" "-DDMSRT_EXPECT=${expect}"
                   -DDMSRT_TIMEOUT=60 -P ${DMSRT_TP_MPI_SCRIPT})
  set_tests_properties(${name} PROPERTIES LABELS mpi TIMEOUT 90 PROCESSORS ${np}
                       ENVIRONMENT "${DMSRT_TP_ENV};${env}")
endfunction()

# World size must equal --tp for generate/score/bench.
dmsrt_tp_must_fail(tp_cli_world_mismatch 2 "--tp 3 under mpirun with 2 ranks.*mpirun -np 3" ""
                   generate --tp 3 --prompt hi --max-tokens 1)
# The default model has 3 KV heads: 2 ranks cannot shard it (tp defaults to the world size).
dmsrt_tp_must_fail(tp_cli_bad_degree 2 "does not divide the model's 3 KV heads.*valid degrees for this model: 1, 3" ""
                   generate --prompt hi --max-tokens 1 --threads 1)
# A rank that fails mid-step brings the job down, named, instead of hanging the group.
dmsrt_tp_must_fail(tp_fail_rank2 3 "dmsrt: rank 2 failed: .*injected failure" "DMSRT_TEST_FAIL_RANK=2"
                   generate --tp 3 --prompt "The capital of France is" --max-tokens 8 --threads 1)
if(Python3_Interpreter_FOUND)
  dmsrt_tp_must_fail(tp_fail_rank0 2 "dmsrt: rank 0 failed: .*injected failure" "DMSRT_TEST_FAIL_RANK=0"
                     score --tp 2 --model ${DMSRT_TP_MODELS}/llama_hf_kv4 --tokens "5 6 7 8" --threads 1)
  set_tests_properties(tp_fail_rank0 PROPERTIES FIXTURES_REQUIRED tp_models)

  string(REPLACE ";" " " dmsrt_tp_flags_str "${DMSRT_TP_MPI_FLAGS}")
  # Default model, TP=3 against TP=1: greedy continuations and teacher-forced logits.
  add_test(NAME tp_default_model
           COMMAND ${Python3_EXECUTABLE} -m pytest -q -s -p no:cacheprovider
                   ${CMAKE_CURRENT_SOURCE_DIR}/mpi/test_tp_model.py)
  set_tests_properties(tp_default_model PROPERTIES LABELS mpi TIMEOUT 300 PROCESSORS 3
    ENVIRONMENT "${DMSRT_TP_ENV};DMSRT_BIN=${PROJECT_BINARY_DIR}/bin/dmsrt;DMSRT_MPIEXEC=${DMSRT_TP_MPIEXEC};DMSRT_MPI_FLAGS=${dmsrt_tp_flags_str};DMSRT_TP_REPORT=${PROJECT_BINARY_DIR}/tp_report.json")
endif()
