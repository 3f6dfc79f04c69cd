# Fuzzing of the model-file parsers (label `fuzz`). tests/fuzz/run_fuzz.sh builds libFuzzer
# targets with clang (the project is built with gcc, so they are compiled separately) and runs
# each for DMSRT_FUZZ_SECONDS; without a usable clang++ the test reports SKIP (exit code 77).
set(DMSRT_FUZZ_SECONDS 20 CACHE STRING "Seconds each fuzz target runs under ctest")
add_test(NAME parser_fuzz
         COMMAND bash ${PROJECT_SOURCE_DIR}/tests/fuzz/run_fuzz.sh ${PROJECT_SOURCE_DIR}
                 ${PROJECT_BINARY_DIR}/fuzz ${DMSRT_FUZZ_SECONDS})
set_tests_properties(parser_fuzz PROPERTIES LABELS fuzz SKIP_RETURN_CODE 77 TIMEOUT 600)

# The OpenAI request parser (launch/service/openai_request.h, gRPC build only): built with the
# project's compiler and its own bounded mutation driver, so it runs wherever the coordinator
# builds; define DMSRT_LIBFUZZER and build with clang -fsanitize=fuzzer for a libFuzzer run.
if(DMSRT_HAVE_GRPC)
  add_executable(openai_request_fuzz ${PROJECT_SOURCE_DIR}/tests/fuzz/openai_request_fuzz.cc)
  target_link_libraries(openai_request_fuzz PRIVATE dmsrt_launch)
  add_test(NAME openai_request_fuzz COMMAND openai_request_fuzz ${DMSRT_FUZZ_SECONDS})
  set_tests_properties(openai_request_fuzz PROPERTIES LABELS fuzz TIMEOUT 300)
endif()
