# Tokenizer oracle: dmsrt's tokenizer and chat templates against llama.cpp (llama-cpp-python) on
# the default model. The test file runs itself under pytest and skips (exit 77) without it; each
# test skips with a reason when the model, llama_cpp, gguf or jinja2 is missing.
find_package(Python3 COMPONENTS Interpreter QUIET)
if(Python3_Interpreter_FOUND)
  add_test(NAME oracle_tokenizer
           COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tests/oracle/test_tokenizer.py)
  set_tests_properties(oracle_tokenizer PROPERTIES
    LABELS oracle
    TIMEOUT 600
    SKIP_RETURN_CODE 77
    ENVIRONMENT "DMSRT_BIN=${PROJECT_BINARY_DIR}/bin/dmsrt;DMSRT_MODEL=${PROJECT_SOURCE_DIR}/models/SmolLM2-135M-Instruct.Q4_1.gguf;PYTHONDONTWRITEBYTECODE=1")
else()
  message(STATUS "dmsrt: python3 not found, oracle_tokenizer test not registered")
endif()
